"""A click group that knows its commands by name and loads each one's module only when it runs."""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from gettext import gettext as _

import click


class LazyGroup(click.Group):
    """Commands given as ``{name: ("package.module:attribute", "First sentence of its help.")}``.

    The module is imported when the command is resolved (it runs, or ``oncoscope NAME --help``).
    The group's own ``--help`` lists the summaries given here instead of importing every module;
    tests/cli/test_init.py checks that each one is its command's first sentence. A command whose
    module is not installed (``oncoscope.bench`` left out of a deployment) is not listed and is
    answered like an unknown command.
    """

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name, (ref, _summary) in self.lazy_commands.items() if _installed(ref)]
        return sorted({*super().list_commands(ctx), *lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self.lazy_commands[cmd_name][0].partition(":")
        try:
            loaded = importlib.import_module(module)  # the one place commands load lazily (why: cli/__init__.py)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                return None  # the command's own module is not installed; a dependency missing inside it is an error
            raise
        return getattr(loaded, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click's, with the lazy commands' summaries taken from the table, not from their modules."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands:
                rows.append((name, click.Command(name, help=self.lazy_commands[name][1])))
            elif (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden:
                rows.append((name, cmd))
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _cmd in rows)
            with formatter.section(_("Commands")):  # (click translates its heading the same way)
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])


def _installed(ref: str) -> bool:
    """Whether the module named by ``ref`` is there, looked up level by level without importing it or
    any package above it that is not imported yet (so ``--help`` does not run ``oncoscope/bench/__init__``)."""
    path = None
    parts = ref.partition(":")[0].split(".")
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        if name in sys.modules:
            path = getattr(sys.modules[name], "__path__", None)
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return False
        path = spec.submodule_search_locations
    return True
