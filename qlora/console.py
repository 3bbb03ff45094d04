"""What a person sees while a stage runs: progress bars with the rate and the time left, one
summary line at the end, and none of the library messages nobody can act on.

Everything goes to stderr; stdout stays clean for tools. On a terminal a bar redraws in place.
In a log (a `dvc queue` worker's, CI, a pipe) there is no terminal to redraw: each refresh is
a line of its own, at most one every LOG_INTERVAL seconds. tqdm's own environment variables
still apply: TQDM_MININTERVAL sets the seconds between refreshes, TQDM_DISABLE=1 hides the bars.
"""

import logging
import os
import re
import sys
import time
import warnings

from tqdm import tqdm

from qlora.outputs import log

LOG_INTERVAL = 10  # seconds between progress lines in a log: six lines per minute of training
KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
CHECKPOINTING_NOTICE = r"`is_gradient_checkpointing` is deprecated"  # a regex matched at the start


class _KernelsNotice(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith(KERNELS_NOTICE)


def quiet_known_noise():
    """Silence the two messages every model load prints that nobody can act on, and nothing else.

    - bitsandbytes, when imported on a CPU with AVX512-BF16, fetches an optional faster kernel for
      its packed 4-bit CPU inference path from the Hugging Face hub (`kernels-community`) and warns
      when it cannot: offline it never can. That path is turned off on every 4-bit layer here
      (qlora/models.py, `keep_4bit_weights_trainable`), so the kernel would go unused anyway.
      The warning fires at import: call this before bitsandbytes is imported (first in `main()`);
      `getLogger` hands back the very logger its module will use.
    - transformers 5 deprecates `model.is_gradient_checkpointing`; peft (on every PeftModel) and
      trl (in the trainer) still read it. Nothing in this project does; the user cannot change it.
    Other warnings of that logger and other FutureWarnings still show.
    """
    logger = logging.getLogger(KERNELS_LOGGER)
    if not any(isinstance(f, _KernelsNotice) for f in logger.filters):
        logger.addFilter(_KernelsNotice())
    warnings.filterwarnings("ignore", message=CHECKPOINTING_NOTICE, category=FutureWarning)


class _LogLines:
    """tqdm's output made fit for a file: tqdm redraws a bar by writing a carriage return and the
    new text over the old one (and moves the cursor up and down for nested bars), which a log
    keeps as one ever-growing line; here each non-blank redraw is a line of its own."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text):
        for line in re.split(r"[\r\n]", text.replace("\x1b[A", "")):  # \x1b[A: tqdm's cursor up
            if line.strip():
                self.stream.write(line.rstrip() + "\n")
        self.stream.flush()

    def flush(self):
        self.stream.flush()


def progress(total, desc, unit="it", leave=True, **kwargs):
    """A tqdm bar on stderr with the rate and the time left; with `desc` None, no bar (a benchmark
    that times the loop asks for none). A passing bar (`leave=False`, such as the val loss inside
    training) shows in a log only when it lasts longer than one interval."""
    if desc is None:
        kwargs["disable"] = True
    terminal = sys.stderr.isatty()
    interval = float(os.environ.get("TQDM_MININTERVAL", 0.1 if terminal else LOG_INTERVAL))
    defaults = dict(mininterval=interval, dynamic_ncols=terminal, delay=0 if terminal or leave else interval)
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr if terminal else _LogLines(sys.stderr),
                **{**defaults, **kwargs})


def note(message):
    """`log(message)` while a bar may be on screen: written above the bars, not through them."""
    with tqdm.external_write_mode(file=sys.stderr):
        log(message)


def seconds_since_start():
    """Wall seconds since this process started, imports included (torch and transformers take a
    few seconds on a CPU): what the person waiting for the stage waited."""
    import psutil

    return time.time() - psutil.Process().create_time()


def done(summary):
    """A stage's last line: what it did and how long it took."""
    log(f"done in {seconds_since_start():.0f} s: {summary}")
