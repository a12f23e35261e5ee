"""Known-harmless third-party notices, filtered at their source (specific loggers and messages only).

Each entry is a message that a normal run of this library triggers and that tells the user nothing actionable;
everything else those libraries log or warn, and every warning of our own, still reaches the terminal.

- transformers, on importing diffusers' pipelines without torchvision: "`CLIPImageProcessor` requires
  torchvision (not installed); falling back to `CLIPImageProcessorPil`" (the fallback is what we use).
- diffusers, loading a UNet-only LoRA file: "No LoRA keys associated to CLIPTextModel ..." (our loader refuses
  files that hold text-encoder weights, so there are never any) and "Loading adapter weights from state_dict led
  to missing keys ..." (our loader counts the tensors that landed in the UNet and refuses a partial load with
  one line: :func:`diffusion_blend.pipelines.loading.load_adapter`).
- diffusers, saving an SD3 pipeline without its T5 encoder (``dblend tiny-base --kind sd3``): "self.text_encoder_3=None
  of type <class 'NoneType'> cannot be saved." (diffusers allows SD3 without T5, and loads the folder back so).
- diffusers, casting a model with ``.to(dtype)``: "There are modules in UNet2DConditionModel that should be kept in
  float32: []. ..." (diffusers warns on every cast, even when the list of such modules is empty; only the empty-list
  form is dropped).
- peft, adding a second adapter: "Already found a `peft_config` attribute in the model" (several adapters on
  one UNet is the design: paper section 3, one LoRA expert per basis reward).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

HARMLESS_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    "diffusers.loaders.lora_pipeline": ("No LoRA keys associated to",),
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
    "diffusers.utils.peft_utils": ("Loading adapter weights from state_dict led to",),
    "diffusers.pipelines.pipeline_utils": ("=None of type <class 'NoneType'> cannot be saved",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: []. Casting directly",),
}
"""Logger name -> message fragments dropped from that logger (and only from it)."""

HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Already found a `peft_config` attribute in the model", UserWarning),
)
"""(message regex, category) of ``warnings.warn`` calls ignored inside :func:`quiet_third_party`."""


class _DropHarmless(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def install_log_filters() -> None:
    """Attach the :data:`HARMLESS_LOG_MESSAGES` filters to their loggers for the rest of the process (idempotent).

    Only for processes that are ours from start to end: the ``dblend`` command line. A library never calls this
    (importing :mod:`diffusion_blend` changes no logger or warnings filter); its own calls use
    :func:`quiet_third_party`, which removes its filters again."""
    for name, fragments in HARMLESS_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(fragments))


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block: the known-harmless log lines and warnings above are dropped (nothing else is); on exit the
    loggers' filters and the warnings filters are as they were, so the user's own pipelines are not affected."""
    added = []
    for name, fragments in HARMLESS_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        log_filter = _DropHarmless(fragments)
        logger.addFilter(log_filter)
        added.append((logger, log_filter))
    try:
        with warnings.catch_warnings():
            for message, category in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, log_filter in added:
            logger.removeFilter(log_filter)


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """Within the block: diffusers' and transformers' weight loading/saving progress bars are off (restored after).

    Loading a local pipeline takes seconds; its bars would put five lines of third-party text before our own
    output (or before the one line of an error). The denoising progress bar of a pipeline call is not affected.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in states:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()
