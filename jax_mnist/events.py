"""TensorBoard event files of a run: one file per committed epoch, beside ``metrics.jsonl``.

``<run>/events.out.tfevents.epoch-00003.jax-mnist`` holds epoch 3's row as scalars at step 3
(``train/loss``, ``train/accuracy``, ``test/loss`` and ``test/accuracy`` (``val/...`` in a run
with a validation split), ``lr``, ``epoch_seconds``); epoch 1's file also holds the recipe's
fields as hparams. ``tensorboard --logdir runs`` shows every run below ``runs``.

One file per epoch, each written whole and renamed into place: TensorBoard never reads half an
epoch, and a resume that trains an epoch again (its checkpoint quarantined) moves that epoch's
file aside (``jax_mnist.rundir``) instead of appending a second copy. The files are derived from
the history, so a resume writes those of any committed epoch that has none (a kill between the
commit and this file, or a run made before jax-mnist wrote them).

tensorboardX builds the protocol buffers and frames the records (TensorBoard's format, with its
CRCs), without TensorFlow.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from jax_mnist.files import write_atomically

PREFIX = "events.out.tfevents.epoch-"
SUFFIX = ".jax-mnist"


def event_file(out: Path, epoch: int) -> Path:
    return Path(out) / f"{PREFIX}{epoch:05d}{SUFFIX}"


def event_files(out: Path) -> dict[int, Path]:
    """epoch -> its event file, for the epochs of ``out`` that have one."""
    found = {}
    for path in Path(out).glob(f"{PREFIX}*{SUFFIX}"):
        number = path.name[len(PREFIX) : -len(SUFFIX)]
        if number.isdigit():
            found[int(number)] = path
    return dict(sorted(found.items()))


def scalars(row: dict) -> dict[str, float]:
    """The scalars of an epoch row, by TensorBoard tag."""
    split = "val" if "val_accuracy" in row else "test"
    return {
        "train/loss": row["train_loss"],
        "train/accuracy": row["train_accuracy"],
        f"{split}/loss": row[f"{split}_loss"],
        f"{split}/accuracy": row[f"{split}_accuracy"],
        "lr": row["lr"],
        "epoch_seconds": row["epoch_seconds"],
    }


def _events(row: dict, recipe: dict | None, wall_time: float) -> list:
    # Here, not at the top: tensorboardX's package imports PyTorch when it is installed (1.5 s),
    # which every command reading a run would pay; only a training writes events.
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import hparams, scalar

    epoch, tags = int(row["epoch"]), scalars(row)
    events = [Event(wall_time=wall_time, step=epoch, file_version="brain.Event:2")]
    if recipe is not None:  # the hparams plugin's experiment and session: the recipe's fields
        experiment, session_start, _ = hparams(
            {k: v for k, v in recipe.items() if v is not None}, {k: tags[k] for k in tags if "/" in k}
        )
        events += [Event(wall_time=wall_time, step=epoch, summary=s) for s in (experiment, session_start)]
    values = [v for tag, number in tags.items() for v in scalar(tag, float(number)).value]
    events.append(Event(wall_time=wall_time, step=epoch, summary=Summary(value=values)))
    return events


def _framed(data: bytes) -> bytes:
    """One record of TensorBoard's file format: length, its CRC, the bytes, their CRC."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def write_epoch(out: Path, row: dict, recipe: dict | None = None, wall_time: float | None = None) -> Path:
    """Write the event file of ``row``'s epoch (with ``recipe``'s fields as hparams when given),
    whole (``files.write_atomically``: a failed write leaves nothing and names the file)."""
    wall_time = time.time() if wall_time is None else wall_time
    content = b"".join(_framed(e.SerializeToString()) for e in _events(row, recipe, wall_time))
    return write_atomically(event_file(out, int(row["epoch"])), content)


__all__ = ["PREFIX", "SUFFIX", "event_file", "event_files", "scalars", "write_epoch"]
