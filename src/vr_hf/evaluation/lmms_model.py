"""`vr_hf`, the lmms-eval model for every vr-hf checkpoint: LLaVA-VR and every graft (`vr_hf.backbones`).

    lmms-eval --model vr_hf --model_args pretrained=outputs/vr-hf/checkpoint,dtype=bfloat16 --batch_size 16 --tasks ...

Installing vr-hf registers it through lmms-eval's `lmms_eval.models` entry point (`vr_hf.evaluation.plugin`).
"""

import itertools

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageTextToText, StoppingCriteria, StoppingCriteriaList

from ..backbones import BACKBONES
from ..processor import load_processor


MODEL_TYPES = tuple(backbone.model_type for backbone in BACKBONES.values())
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 128


class VisionRememberLMMS(lmms):
    """A vr-hf checkpoint as an lmms-eval model (`--model vr_hf`).

    Every request becomes one user turn of the checkpoint's chat template: the request's images, then its text.
    `generate_until` batches requests with the same generation settings; `loglikelihood` scores every continuation
    of one prompt in one forward pass and, as Vision Remember's contract asks, passes `labels` that are -100 on the
    prompt, so that the text-guided token pools the prompt only and never the continuation it scores.

    `loglikelihood` answers each request with `(negative log-likelihood of the continuation, summed over its tokens,
    is_greedy)`: the loss, as lmms-eval's own models return it and as its `multiple_choice` scoring expects (the lowest
    value wins). The pair comes wrapped in a `GenerationResult`: lmms-eval 0.7.3's evaluator passes every response
    through `unwrap_generation_output`, which turns a bare tuple into its string and breaks the scoring; a wrapped
    pair reaches the task intact.

    Args (`--model_args`):
        pretrained: Folder or Hub id of the checkpoint.
        dtype: `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
        device: `cuda`, `cuda:1`, `cpu`...; default: `cuda` where there is one.
        attn_implementation: `eager`, `sdpa`, `flash_attention_2`...; default: Transformers' choice.
        batch_size: Requests per forward pass (the `lmms-eval` command passes its `--batch_size` here).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        **unknown,
    ):
        super().__init__()
        check_arguments(dtype, batch_size, unknown)
        config = AutoConfig.from_pretrained(pretrained)
        if config.model_type not in MODEL_TYPES:
            raise ValueError(
                f"{pretrained} is a {config.model_type!r} checkpoint: --model vr_hf evaluates vr-hf checkpoints "
                f"(model_type {', '.join(MODEL_TYPES)}). Use lmms-eval's own model for other checkpoints."
            )
        self.processor = load_processor(pretrained, config)
        if self.processor.chat_template is None:
            raise ValueError(f"{pretrained} has no chat template: save one with its processor or tokenizer.")
        self.processor.tokenizer.padding_side = "left"  # prompts of a batch end together, where generation starts
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype, **extra)
        self.model.to(self._device).eval()
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        return self._device

    def images(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        """The images `doc_to_visual` gives for a document; none for a text-only task."""
        return checked_images(doc_to_visual(self.task_dict[task][split][doc_id]), task)

    def chat_prompt(self, images: list[Image.Image], text: str) -> str:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def encode(self, images: list[Image.Image], prompts: list[str]):
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        return inputs.to(self.device, self.model.dtype)

    @torch.inference_mode()
    def generate(self, contexts: list[str], images: list[list[Image.Image]], generation_kwargs: dict) -> list[str]:
        settings, stop_strings = generation_settings(generation_kwargs)
        prompts = [self.chat_prompt(sample_images, context) for sample_images, context in zip(images, contexts)]
        inputs = self.encode([image for sample_images in images for image in sample_images], prompts)
        prompt_length = inputs["input_ids"].shape[1]
        stop = StoppingCriteriaList([GeneratedTextContains(stop_strings, self.processor, prompt_length)])
        output = self.model.generate(
            **inputs, **settings, stopping_criteria=stop, pad_token_id=self.processor.tokenizer.pad_token_id
        )
        texts = self.processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        return [cut_at_stop_strings(text, stop_strings) for text in texts]

    def generate_until(self, requests) -> list[str]:
        batches = Collator([request.args for request in requests], lambda args: -len(args[0]), grouping=True)
        answers = []
        with tqdm(total=len(requests), desc="vr_hf generate_until", disable=self.rank != 0) as progress:
            for batch in batches.get_batched(n=self.batch_size):
                contexts, generation_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*batch)
                images = [self.images(*arguments) for arguments in zip(doc_to_visual, tasks, splits, doc_ids)]
                answers += self.generate(list(contexts), images, generation_kwargs[0])
                progress.update(len(batch))
        return batches.get_original(answers)

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """One conversation per request, one user turn per round, as lmms-eval's own models run them.

        Round 0 asks the request's context about `doc_to_visual`'s images. After each round the task's
        `doc_to_text(doc, round_idx=..., previous_output=..., previous_round_info=...)` returns the next round's
        `(images, text, done, outputs so far, round info)`; the answer is every round's output.
        """
        conversations = []
        for request in tqdm(requests, desc="vr_hf generate_until_multi_round", disable=self.rank != 0):
            context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            images, outputs, round_info = self.images(doc_to_visual, task, split, doc_id), [], None
            for round_idx in itertools.count(1):
                outputs.append(self.generate([context], [images], generation_kwargs)[0])
                visuals, context, done, outputs, round_info = doc_to_text(
                    doc, round_idx=round_idx, previous_output=list(outputs), previous_round_info=round_info
                )
                if done:
                    break
                images = checked_images(visuals, task)
            conversations.append(list(outputs))
        return conversations

    def loglikelihood(self, requests) -> list[GenerationResult]:
        prompts = {}  # the continuations of one prompt (a question's choices) share forward passes
        for index, request in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # `loglikelihood` tasks pass doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            prompts.setdefault((context, doc_to_visual, doc_id, task, split), []).append((index, continuation))
        scores = [None] * len(requests)
        with tqdm(total=len(requests), desc="vr_hf loglikelihood", disable=self.rank != 0) as progress:
            for (context, doc_to_visual, doc_id, task, split), continuations in prompts.items():
                images = self.images(doc_to_visual, task, split, doc_id)
                prompt = self.chat_prompt(images, context)
                for start in range(0, len(continuations), self.batch_size):
                    chunk = continuations[start : start + self.batch_size]
                    tokens = [self.tokenize(text) for _, text in chunk]
                    for (index, _), score in zip(chunk, self.score(prompt, images, tokens)):
                        scores[index] = GenerationResult(text=score)
                    progress.update(len(chunk))
        return scores

    def tokenize(self, continuation: str) -> list[int]:
        tokens = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"Cannot score an empty continuation: got {continuation!r}.")
        return tokens

    def score(
        self, prompt: str, images: list[Image.Image], continuations: list[list[int]]
    ) -> list[tuple[float, bool]]:
        """(Negative log-likelihood, is_greedy) of each continuation (token ids) after `prompt`."""
        log_probs, greedy = self.continuation_log_probs(prompt, images, continuations)
        return [(-float(total), bool(flags.all())) for total, flags in zip(log_probs.sum(1), greedy)]

    @torch.inference_mode()
    def continuation_log_probs(
        self, prompt: str, images: list[Image.Image], continuations: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each continuation token's log-probability after `prompt`, and whether it is the model's greedy choice:
        `(len(continuations), longest)` each, right-padded with 0 and True. One forward pass for all."""
        inputs = self.encode(images * len(continuations), [prompt] * len(continuations))
        prompt_length = inputs["input_ids"].shape[1]
        tokens, mask = self.padded(continuations)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)
        if "mm_token_type_ids" in inputs:  # text positions are type 0
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], dim=1)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, prompt_length:] = tokens.masked_fill(mask == 0, -100)
        logits = self.model(**inputs, labels=labels).logits[:, prompt_length - 1 : -1].float()
        log_probs = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
        return log_probs, (logits.argmax(-1) == tokens) | (mask == 0)

    def padded(self, continuations: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The continuations right-padded, and the mask of their real tokens."""
        width = max(len(tokens) for tokens in continuations)
        padded = torch.full((len(continuations), width), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(continuations), width), dtype=torch.long)
        for row, tokens in enumerate(continuations):
            padded[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return padded.to(self.device), mask.to(self.device)


def checked_images(visuals: list | None, task: str) -> list[Image.Image]:
    for visual in visuals or []:
        if not isinstance(visual, Image.Image):
            raise ValueError(f"Task {task} gives a {type(visual).__name__}: vr_hf takes images only.")
    return [visual.convert("RGB") for visual in visuals or []]


def check_arguments(dtype: str, batch_size, unknown: dict):
    if unknown:
        raise ValueError(
            f"Unknown --model_args for vr_hf: {sorted(unknown)}. It takes pretrained, dtype, device, "
            "attn_implementation and batch_size."
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a whole number of requests, 1 or more.")


def generation_settings(generation_kwargs: dict) -> tuple[dict, list[str]]:
    """A task's `generation_kwargs` as `generate()` arguments, and its stop strings (`until`).

    As in lmms-eval, temperature 0 (the default) means greedy decoding; settings only other models read are ignored.
    """
    until = generation_kwargs.get("until") or []
    temperature = generation_kwargs.get("temperature") or 0
    do_sample = bool(generation_kwargs.get("do_sample", True)) and temperature > 0
    settings = {
        "max_new_tokens": generation_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        "num_beams": generation_kwargs.get("num_beams", 1),
        "do_sample": do_sample,
    }
    if do_sample:
        settings.update(temperature=temperature, top_p=generation_kwargs.get("top_p") or 1.0)
    return settings, [until] if isinstance(until, str) else list(until)


class GeneratedTextContains(StoppingCriteria):
    """Stops a sample once its generated text holds a stop string. (`generate(stop_strings=...)` also matches across
    the end of the prompt: lmms-eval's default stop string, two line breaks, would end an answer that starts with a
    line break right after a chat prompt that ends with one.)"""

    def __init__(self, stop_strings: list[str], processor, prompt_length: int):
        self.stop_strings, self.processor, self.prompt_length = stop_strings, processor, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.processor.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, device=input_ids.device)


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text
