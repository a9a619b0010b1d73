"""Train a model on the synthetic task (answer-only loss) and score it on held-out data."""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import Trainer, TrainingArguments

from .tasks import QUESTION_KINDS, Sample


@dataclass
class RunSettings:
    steps: int
    batch_size: int
    learning_rate: float
    seed: int


def conversation(question: str, answer: str | None = None, image: Image.Image | None = None) -> list[dict]:
    image_part = {"type": "image", "image": image} if image is not None else {"type": "image"}
    messages = [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def dialogue(sample: Sample, rng: np.random.Generator) -> list[dict]:
    """All of a sample's questions, in a random order, as one chat about its image, each answered."""
    (question, answer), *others = [sample.questions[index] for index in rng.permutation(len(sample.questions))]
    messages = conversation(question, answer, Image.fromarray(sample.image))
    for question, answer in others:
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def answer_labels(input_ids: list[int], generation_prompt: list[int], end_of_turn: int) -> torch.Tensor:
    """Labels that supervise the answers only: what follows each generation prompt, up to its end of turn."""
    labels, answering = [], False
    for index, token in enumerate(input_ids):
        labels.append(token if answering else -100)
        if answering:
            answering = token != end_of_turn
        else:
            answering = input_ids[max(index + 1 - len(generation_prompt), 0) : index + 1] == generation_prompt
    return torch.tensor(labels)


class AnswerDataset(torch.utils.data.Dataset):
    """Samples encoded once by the model's processor, both questions of an image in one chat, in a seeded random
    order; the loss is on the answers only, so the text-guided token pools the first question, as it pools the only
    one at evaluation, whichever kind it is."""

    def __init__(self, samples: list[Sample], processor, generation_prompt: list[int], seed: int):
        rng, end_of_turn = np.random.default_rng(seed), processor.tokenizer.eos_token_id
        self.items = [
            self.encode(dialogue(sample, rng), processor, generation_prompt, end_of_turn) for sample in samples
        ]

    @staticmethod
    def encode(messages: list[dict], processor, generation_prompt: list[int], end_of_turn: int) -> dict:
        text = processor.apply_chat_template(messages)
        image = messages[0]["content"][0]["image"]
        encoded = processor(images=[image], text=[text], return_tensors="pt")
        input_ids = encoded["input_ids"][0]
        labels = answer_labels(input_ids.tolist(), generation_prompt, end_of_turn)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": encoded["pixel_values"][0]}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(pad_token_id: int):
    def pad(sequences, value):
        return torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=value)

    def collate_batch(items: list[dict]) -> dict:
        input_ids = pad([item["input_ids"] for item in items], pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": pad([torch.ones_like(item["input_ids"]) for item in items], 0),
            "labels": pad([item["labels"] for item in items], -100),
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        }

    return collate_batch


def train(model, dataset: AnswerDataset, settings: RunSettings, output_dir: str, pad_token_id: int, callbacks=None):
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.steps // 10,
        weight_decay=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=settings.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=collate(pad_token_id),
        callbacks=callbacks or [],
    )
    trainer.train()
    return model.eval()


def question_types(samples: list[Sample]) -> dict[str, list[tuple[Sample, str, str]]]:
    """Every held-out question, grouped by type (`"text which"`, `"chart where"`, ...), with its sample and answer."""
    groups = {}
    for sample in samples:
        for kind, (question, answer) in zip(QUESTION_KINDS, sample.questions):
            groups.setdefault(f"{sample.task} {kind}", []).append((sample, question, answer))
    return dict(sorted(groups.items()))


@torch.no_grad()
def correct_by_type(model, processor, samples: list[Sample], batch_size: int = 64) -> dict[str, list[bool]]:
    """Whether each held-out question, asked alone, gets its exact answer (greedy), per question type, in order."""
    correct = {}
    for question_type, questions in question_types(samples).items():
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            prompts = [
                processor.apply_chat_template(conversation(question), add_generation_prompt=True)
                for _, question, _ in batch
            ]
            images = [Image.fromarray(sample.image) for sample, _, _ in batch]
            inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
            generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
            answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            hits = [reply.strip() == answer for reply, (_, _, answer) in zip(answers, batch)]
            correct.setdefault(question_type, []).extend(hits)
    return correct


def answer_prior(samples: list[Sample]) -> dict[str, float]:
    """Accuracy of always giving each question type's most frequent answer: what ignoring the image reaches."""
    result = {}
    for question_type, questions in question_types(samples).items():
        answers = [answer for _, _, answer in questions]
        result[question_type] = max(answers.count(answer) for answer in set(answers)) / len(answers)
    return result
