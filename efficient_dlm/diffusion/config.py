"""The `diffusion` config section: the training objective and its corruption (docs/METHOD.md sections 2-4).

Its fields and defaults are the section's schema (`--config.diffusion.key=value`); `validate()` checks
what the section alone decides. Checks against other sections (a block size dividing data.seq_len)
are composed in efficient_dlm/config.py.
"""
from __future__ import annotations

import dataclasses

from efficient_dlm.diffusion.objectives import MASKINGS, OBJECTIVES, WEIGHTINGS, Objective, check_confidence
from efficient_dlm.diffusion.opd import OBJECTIVE as OPD
from efficient_dlm.diffusion.schedule import parse_schedule
from efficient_dlm.errors import UserError
from efficient_dlm.section import Section, choice

MASK_TOKEN_MODES = ("model", "append")
BLOCK_OBJECTIVES = ("block", "block_diffusion")  # the objectives whose attention has blocks


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(Section):
    SECTION = "diffusion"

    objective: str = "block_diffusion"  # block_diffusion (clean context) | block | bidirectional | ar | opd
    block_size: int = 32
    block_size_schedule: str = ""  # "step:size,..." e.g. "0:4,500:32,2000:64" (LLaDA2.0 WSD)
    masking: str = "position"  # position (Efficient-DLM, per block) | uniform (MDLM)
    half_life: float = 0.25  # h: lambda = ln 2 / (h * block_size)
    rate_min: float = 1e-3  # per-block rate m ~ U(rate_min, rate_max) (eps; clipped rates)
    rate_max: float = 1.0
    complementary: bool = False  # each row also trained with the complementary mask
    token_shift: bool = False  # predict token i from the hidden state at i - 1
    loss_weighting: str = "elbo"  # elbo (CE * n / k per block) | mean; both / masked-token count
    mask_token: str = "model"  # model: model.mask_token_id | append: a new embedding row
    vocab_multiple: int = 128  # with append: vocabulary padded to this multiple
    valid_vocab_size: int | None = None  # ids >= this never predicted (set by append)
    mask_noise_std: float = 0.0  # Gaussian noise on [MASK] embeddings (LLaDA2.0) ...
    mask_noise_steps: int = 0  # ... for the first this many steps
    ar_weight: float = 0.0  # > 0: + ar_weight * causal next-token loss (Nemotron-Labs Diffusion), for verifier="self"
    confidence_weight: float = 0.0  # > 0: CAP (LLaDA2.0): + weight * entropy at masked, already-correct positions (METHOD 9)
    confidence_temperature: float = 1.0  # CAP's entropy is of softmax(logits / this) (dParallel uses 0.5)

    def validate(self) -> None:
        choice(self.objective, (*OBJECTIVES, OPD), "diffusion.objective")
        choice(self.masking, MASKINGS, "diffusion.masking")
        choice(self.loss_weighting, WEIGHTINGS, "diffusion.loss_weighting")
        choice(self.mask_token, MASK_TOKEN_MODES, "diffusion.mask_token")
        if self.block_size <= 0:
            raise UserError(f"diffusion.block_size must be positive, got {self.block_size}")
        self.block_sizes()  # the schedule parses (names its item otherwise)
        if not 0.0 < self.rate_min <= self.rate_max <= 1.0:
            raise UserError(
                f"diffusion.rate_min / rate_max must satisfy 0 < min <= max <= 1, got {self.rate_min}, {self.rate_max}"
            )
        if self.half_life <= 0:
            raise UserError(f"diffusion.half_life must be positive, got {self.half_life}")
        if self.vocab_multiple <= 0:
            raise UserError(f"diffusion.vocab_multiple must be positive, got {self.vocab_multiple}")
        if self.valid_vocab_size is not None and self.valid_vocab_size <= 0:
            raise UserError(f"diffusion.valid_vocab_size must be positive (or unset), got {self.valid_vocab_size}")
        for key in ("mask_noise_std", "mask_noise_steps", "ar_weight"):
            if getattr(self, key) < 0:
                raise UserError(f"diffusion.{key} must be >= 0, got {getattr(self, key)}")
        try:
            check_confidence(self.objective, self.confidence_weight, self.confidence_temperature)
        except ValueError as err:
            raise UserError(str(err)) from None

    @property
    def has_blocks(self) -> bool:
        return self.objective in BLOCK_OBJECTIVES

    def block_sizes(self) -> list[tuple[int, int]]:
        """(step, block size) pairs of diffusion.block_size_schedule ([(0, block_size)] without one)."""
        return parse_schedule(self.block_size_schedule, self.block_size)

    def make_objective(self, mask_token_id: int | None, block_size: int | None = None) -> Objective:
        """The loss's static description for a model whose [MASK] is `mask_token_id`; `block_size`
        overrides diffusion.block_size (the block-size schedule's current value)."""
        return Objective(
            kind=self.objective, block_size=self.block_size if block_size is None else block_size,
            masking=self.masking, half_life=self.half_life, rate_min=self.rate_min, rate_max=self.rate_max,
            complementary=self.complementary, token_shift=self.token_shift, weighting=self.loss_weighting,
            mask_token_id=mask_token_id, mask_noise_std=self.mask_noise_std, mask_noise_steps=self.mask_noise_steps,
            ar_weight=self.ar_weight, confidence_weight=self.confidence_weight,
            confidence_temperature=self.confidence_temperature,
        )
