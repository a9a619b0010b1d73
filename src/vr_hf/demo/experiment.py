"""Train a model on the synthetic task (answer-only loss) and score it on held-out data."""

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PrinterCallback, Trainer, TrainingArguments

from .tasks import Sample


@dataclass
class RunSettings:
    steps: int
    batch_size: int
    learning_rate: float
    seed: int


def conversation(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class AnswerDataset(torch.utils.data.Dataset):
    """Samples encoded once by the model's processor; the loss is on the answer only."""

    def __init__(self, samples: list[Sample], processor):
        self.items = [self.encode(sample, processor) for sample in samples]

    @staticmethod
    def encode(sample: Sample, processor) -> dict:
        prompt = processor.apply_chat_template(conversation(sample.question), add_generation_prompt=True)
        full = processor.apply_chat_template(conversation(sample.question, sample.answer))
        encoded = processor(images=[Image.fromarray(sample.image)], text=[full], return_tensors="pt")
        prompt_length = len(processor(images=[Image.fromarray(sample.image)], text=[prompt])["input_ids"][0])
        labels = encoded["input_ids"][0].clone()
        labels[:prompt_length] = -100
        return {"input_ids": encoded["input_ids"][0], "labels": labels, "pixel_values": encoded["pixel_values"][0]}

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


def train(
    model, dataset: AnswerDataset, settings: RunSettings, output_dir: str, pad_token_id: int, callbacks=None
) -> list[list[float]]:
    """Train `model` in place and leave it in eval mode; return its training curve, `[step, loss]` twenty times over
    the schedule (each the mean loss since the previous one)."""
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.steps // 10,
        weight_decay=0.0,
        logging_steps=max(settings.steps // 20, 1),
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
    trainer.remove_callback(PrinterCallback)  # the curve is returned, not printed
    trainer.train()
    model.eval()
    return [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]


@torch.no_grad()
def correct_by_task(
    model, processor, samples: list[Sample], questions: dict[str, str], batch_size: int = 64
) -> dict[str, list[bool]]:
    """Whether each held-out sample gets its exact answer (greedy), per question type in `questions`' order (its
    family's: type -> question), samples in order."""
    correct = {}
    for task, question in questions.items():
        task_samples = [sample for sample in samples if sample.task == task]
        prompt = processor.apply_chat_template(conversation(question), add_generation_prompt=True)
        correct[task] = []
        for start in range(0, len(task_samples), batch_size):
            batch = task_samples[start : start + batch_size]
            images = [Image.fromarray(sample.image) for sample in batch]
            inputs = processor(images=images, text=[prompt] * len(batch), return_tensors="pt")
            generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
            answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct[task] += [answer.strip() == sample.answer for answer, sample in zip(answers, batch)]
    return correct


def accuracy(correct: dict[str, list[bool]]) -> float:
    """The share of all questions answered right, every question type's together."""
    hits = [hit for type_hits in correct.values() for hit in type_hits]
    return sum(hits) / len(hits)


def answer_prior(samples: list[Sample], questions: dict[str, str]) -> dict[str, float]:
    """Accuracy of always giving each question type's most frequent answer: what a model that ignores the image
    reaches."""
    result = {}
    for task in questions:
        answers = [sample.answer for sample in samples if sample.task == task]
        result[task] = max(answers.count(answer) for answer in set(answers)) / len(answers)
    return result
