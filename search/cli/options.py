"""Options shared by clipseek's commands."""

from __future__ import annotations

import os
import re

import click

from indexer.config import PIXEL_BUDGET


def _stay_offline(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    # Set for the whole process, so that every model load of the command (the HTTP server's, a
    # Ray worker's) stays offline too, as CLIPSEEK_OFFLINE=1 would.
    if value:
        os.environ["CLIPSEEK_OFFLINE"] = "1"


offline_option = click.option(
    "--offline",
    is_flag=True,
    expose_value=False,
    callback=_stay_offline,
    help="Never use the network: a model missing from the cache is an error (also CLIPSEEK_OFFLINE=1).",
)

index_option = click.option(
    "--index",
    "index",
    metavar="NAME|DIR",
    help="An index by name (in $CLIPSEEK_HOME, else $XDG_DATA_HOME/clipseek) or by folder. Default: 'default'.",
)
# For the commands that read an index: its model's weights when they are no longer where the
# index was made (another machine, a moved file); they must be the same weights (sha256).
_checkpoint_option = click.option(
    "--checkpoint", type=click.Path(dir_okay=False), help="The index model's weights, if they moved."
)


class Pixels(click.ParamType):
    """A number of pixels: 50000000, 50M or 50MP (megapixels), 12000x12000."""

    name = "pixels"

    def convert(self, value, param, ctx):
        text = str(value).strip().upper()
        pixels = 0.0
        if match := re.fullmatch(r"([0-9]+)\s*[X×]\s*([0-9]+)", text):
            pixels = int(match.group(1)) * int(match.group(2))
        elif match := re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(MP?)?", text):
            pixels = float(match.group(1)) * (1e6 if match.group(2) else 1)
        if pixels < 1:
            self.fail(f"{value!r} is not a number of pixels (for example 50M, or 8000x6000)", param, ctx)
        return int(pixels)


# For commands that read pictures from others (`serve`, `moderate`): a header that declares
# more pixels is refused before decoding.
max_pixels_option = click.option(
    "--max-pixels",
    type=Pixels(),
    default=f"{PIXEL_BUDGET // 10**6}M",
    show_default=True,
    help="Refuse pictures of more pixels (50M: 50 megapixels; or 8000x6000), from their header, before decoding.",
)


class Device(click.ParamType):
    """A device to embed on: auto, cpu, cuda, cuda:N or mps (checked to exist when the command runs)."""

    name = "device"

    def convert(self, value, param, ctx):
        from indexer.errors import DeviceError
        from indexer.models.devices import parse

        try:
            return parse(str(value))
        except DeviceError as error:
            self.fail(str(error), param, ctx)


device_option = click.option(
    "--device",
    type=Device(),
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda|cuda:N|mps",
    help="Where the model embeds; auto: an NVIDIA GPU where one can be used, else the CPU.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")


def options(*decorators):
    """Apply several click options as one decorator."""

    def decorate(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


weights_option = options(_checkpoint_option, offline_option)
model_options = options(
    click.option("--model", help="open_clip architecture for a new index [default: ViT-B-32; 'demo']."),
    click.option("--pretrained", metavar="TAG", help="Pretrained tag [ViT-B-32: laion2b_s34b_b79k]."),
    click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights (.safetensors)."),
    offline_option,
    # Missing weights download without being asked; the flag stays accepted for older scripts.
    click.option("--download", is_flag=True, hidden=True, expose_value=False),
)
output_options = options(
    json_option,
    click.option("--paths", "paths_only", is_flag=True, help="Print only paths (or captions), one a line."),
)


class MinScore(click.ParamType):
    """A cosine between -1 and 1, or `match`: the model's own even odds (indexer.models.scores)."""

    name = "SCORE|match"

    def convert(self, value, param, ctx):
        from indexer.models.scores import MATCH

        if isinstance(value, float) or value == MATCH:
            return value
        try:
            score = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'match'", param, ctx)
        if not -1 <= score <= 1:
            self.fail(f"{value} is not between -1 and 1", param, ctx)
        return score
