"""The prompt rule: which text feeds each text-guided token, and which vision tokens each vision token reads.

A sample's text is a sequence of turns, each a prompt (which may hold images) and what answers it. A prompt ends
- before each run of supervised tokens (with `labels`): the answers of training, never pooled;
- after each generation prompt of the chat template (`config.generation_prompt_ids`, e.g. `<|im_start|>assistant\n`),
  which is where the answer of a chat turn starts, in training and in generation alike.

An image belongs to the first turn whose prompt ends after it. Its vision tokens attend to the vision tokens of their
sample's turns up to their own, and to their turn's text-guided token: a max-pool over the sample's text up to the end
of their turn's prompt (placeholders, padding and, with `prompt_mask`, what it leaves out never feed it). So nothing
of a later turn reaches an earlier turn, and a turn's vision tokens are the same in a teacher-forced forward as when
its answer is generated.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.utils import logging


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
PLACEHOLDER, POOLED, ANSWER_START, GENERATION_PROMPT_END = 1, 2, 4, 8  # bits of the marks read from the device


@dataclass
class PromptTurns:
    """What Vision Remember reads of a batch's text, on the host, each `(batch, sequence)`."""

    placeholders: torch.Tensor  # the image placeholders
    pooled: torch.Tensor  # the text that may feed a text-guided token
    # `(batch, sequence + 1)`, since a prompt may end with the sequence:
    answer_starts: torch.Tensor  # the first position of each run of supervised tokens
    generation_prompt_ends: torch.Tensor  # the first position after each generation prompt

    @classmethod
    def read(cls, config, placeholders, input_ids=None, attention_mask=None, labels=None, prompt_mask=None):
        """From the device, in one read: `placeholders` `(batch, sequence)` and the text around them."""
        pooled = ~placeholders
        video_token_id = getattr(config, "video_token_id", None)
        if input_ids is not None and video_token_id is not None:
            pooled &= input_ids != video_token_id
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            pooled &= attention_mask.bool()
        if prompt_mask is not None:
            prompt_mask = prompt_mask.bool()[:, : pooled.shape[1]]
            pooled &= F.pad(prompt_mask, (0, pooled.shape[1] - prompt_mask.shape[1]), value=False)
        marks = F.pad(placeholders.to(torch.uint8) * PLACEHOLDER + pooled.to(torch.uint8) * POOLED, (0, 1))
        if labels is not None:
            supervised = labels != IGNORE_INDEX
            starts = supervised & ~F.pad(supervised[:, :-1], (1, 0), value=False)
            marks[:, :-1] += starts.to(torch.uint8) * ANSWER_START
        prompt_ids = config.generation_prompt_ids
        if input_ids is not None and prompt_ids and input_ids.shape[1] >= len(prompt_ids):
            found = (input_ids.unfold(1, len(prompt_ids), 1) == input_ids.new_tensor(prompt_ids)).all(dim=-1)
            marks[:, len(prompt_ids) :] += found.to(torch.uint8) * GENERATION_PROMPT_END
        marks = marks.cpu()
        placeholders, pooled = (marks[:, :-1] & bit > 0 for bit in (PLACEHOLDER, POOLED))
        return cls(placeholders, pooled, marks & ANSWER_START > 0, marks & GENERATION_PROMPT_END > 0)

    @property
    def ends_so_far(self) -> torch.Tensor:
        """`(batch, sequence + 1)`: how many prompts of each sample end at or before each position."""
        return (self.answer_starts | self.generation_prompt_ends).cumsum(dim=1)

    @property
    def turns(self) -> torch.Tensor:
        """Each position's turn: how many prompts of its sample end at or before it."""
        return self.ends_so_far[:, :-1]

    def warn_where_unclear(self, config, labels_given: bool, prompt_mask_given: bool):
        """Say once where the rule cannot do what the caller most likely wants."""
        token_batch, token_position = self.placeholders.nonzero(as_tuple=True)
        turns, ends = self.turns, self.ends_so_far[:, -1]
        token_turn = turns[token_batch, token_position]
        if labels_given:
            first_pooled = self.pooled.int().argmax(dim=1)
            first_pooled_turn = torch.where(self.pooled.any(dim=1), turns.gather(1, first_pooled[:, None])[:, 0], -1)
            unguided = (first_pooled_turn[token_batch] < 0) | (first_pooled_turn[token_batch] > token_turn)
            chat = self.generation_prompt_ends.any(dim=1)
            not_after_a_generation_prompt = (self.answer_starts & ~self.generation_prompt_ends).any(dim=1) & chat
            if unguided.any() or not_after_a_generation_prompt[token_batch].any():
                logger.warning_once(
                    "The labels of a sample with images supervise more than its answers (supervision starts where no "
                    "generation prompt ends), and a prompt ends where supervision starts: in training its text-guided "
                    "token pools less of the prompt than at inference. Supervise the answers only (labels -100 on the "
                    "prompt, or SFTConfig(assistant_only_loss=True))."
                )
        elif not prompt_mask_given and (ends[token_batch] == token_turn).any():
            logger.warning_once(
                "Vision Remember cannot tell where the prompt of a sample ends (no generation prompt "
                f"{config.generation_prompt_ids} follows its last image), so all the text after it feeds the "
                "text-guided token, a continuation scored after the prompt included: pass labels (-100 on the prompt) "
                "or prompt_mask (True on the prompt)."
            )
