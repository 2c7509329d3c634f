"""Options shared by clipseek's commands."""

from __future__ import annotations

import click

index_option = click.option(
    "--index",
    "index",
    metavar="NAME|DIR",
    help="An index by name (in $CLIPSEEK_HOME, else $XDG_DATA_HOME/clipseek) or by folder. Default: 'default'.",
)
# For the commands that read an index: its model's weights when they are no longer where the
# index was made (another machine, a moved file); they must be the same weights (sha256).
weights_option = click.option(
    "--checkpoint", type=click.Path(dir_okay=False), help="The index model's weights, if they moved."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")


def options(*decorators):
    """Apply several click options as one decorator."""

    def decorate(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


model_options = options(
    click.option("--model", help="open_clip architecture for a new index [default: ViT-B-32; 'demo']."),
    click.option("--pretrained", metavar="TAG", help="Pretrained tag [ViT-B-32: laion2b_s34b_b79k]."),
    click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights (.safetensors)."),
    click.option("--download", is_flag=True, help="Let open_clip download weights missing from the cache."),
)
output_options = options(
    json_option,
    click.option("--paths", "paths_only", is_flag=True, help="Print only paths (or captions), one a line."),
)
