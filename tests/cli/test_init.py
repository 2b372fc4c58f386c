"""The command group (oncoscope/cli/__init__.py, cli/lazy.py): every command is listed, each
command's module is imported only when it runs, and `oncoscope serve` never imports torch or the
training code. Import checks run in a fresh interpreter, since this one has imported much already."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from oncoscope.cli import COMMANDS, main
from oncoscope.cli.lazy import LazyGroup

REPO = Path(__file__).resolve().parents[2]
OFFLINE = ("torch", "oncoscope.training", "oncoscope.evaluation", "oncoscope.bench")


def imported_by(args: list[str], tmp_path, before: str = "") -> tuple[int, set[str]]:
    """Run ``oncoscope ARGS`` in a fresh interpreter; its exit status and the modules it imported."""
    code = textwrap.dedent(f"""
        import json, sys
        from oncoscope.cli import main
        {before}
        try:
            main({args!r}, prog_name="oncoscope")
            status = 0
        except SystemExit as exc:
            status = exc.code
        print("\\n" + json.dumps({{"status": status, "modules": sorted(sys.modules)}}))
    """)
    env = {**os.environ, "ONCOSCOPE_HOME": str(tmp_path / "inst")}
    env.pop("DATABASE_URL", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["status"], set(out["modules"])


def loaded(modules: set[str], *prefixes: str) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_console_script_installed():
    exe = Path(sys.executable).parent / "oncoscope"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("serve", "train", "evaluate", "predict", "bench", "data", "backup", "restore"):
        assert cmd in out.stdout


def test_python_dash_m_runs_the_same_command_line():
    """bench/load.py falls back to `python -m oncoscope.cli` where the console script is not installed."""
    out = subprocess.run([sys.executable, "-m", "oncoscope.cli", "db", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0 and "upgrade" in out.stdout, out.stderr


def test_help_imports_no_command_module(tmp_path):
    status, modules = imported_by(["--help"], tmp_path)
    assert status == 0
    command_modules = {ref.partition(":")[0] for ref, _ in COMMANDS.values()}
    assert not modules & command_modules
    assert not loaded(modules, *OFFLINE, "flask", "sqlalchemy", "oncoscope.web", "oncoscope.store")


@pytest.mark.parametrize("args", [["serve", "--help"], ["db", "current"], ["predict", "--help"], ["users", "--help"],
                                  ["backup", "--help"], ["audit", "--help"]])
def test_serving_commands_import_no_torch_no_training(tmp_path, args):
    status, modules = imported_by(args, tmp_path)
    assert status == 0
    assert not loaded(modules, *OFFLINE), loaded(modules, *OFFLINE)


def test_db_current_imports_no_web_app(tmp_path):
    status, modules = imported_by(["db", "current"], tmp_path)
    assert status == 0 and not loaded(modules, "oncoscope.web", "flask", "oncoscope.analyzers")


def test_serve_with_the_whole_app_built_imports_no_torch_no_training(tmp_path):
    """`oncoscope serve` up to the app the server runs (waitress itself replaced by building the app)."""
    status, modules = imported_by(["serve"], tmp_path, before=(
        "import oncoscope.cli.server as server; from oncoscope.web import create_app\n"
        "        server.run_server = lambda st, *a: create_app(settings=st, start_workers=False)"))
    assert status == 0
    assert "oncoscope.web" in modules and "oncoscope.analyzers.registry" in modules
    assert not loaded(modules, *OFFLINE), loaded(modules, *OFFLINE)


def test_train_loads_its_module_when_it_runs(tmp_path):
    status, modules = imported_by(["train", "--help"], tmp_path)
    assert status == 0 and "oncoscope.cli.models" in modules and "oncoscope.cli.server" not in modules


def test_listed_summaries_are_the_commands_own_and_help_is_unchanged(tmp_path):
    """The table's summaries are each command's first sentence, so `oncoscope --help` lists exactly
    what click would list with every command loaded (checked at several widths)."""
    code = textwrap.dedent("""
        import click
        from oncoscope.cli import COMMANDS, main
        ctx = click.Context(main, info_name="oncoscope")
        problems = []
        commands = {name: main.get_command(ctx, name) for name in COMMANDS}
        for name, (ref, summary) in COMMANDS.items():
            listed = click.Command(name, help=summary)
            for limit in range(10, 300):
                if listed.get_short_help_str(limit) != commands[name].get_short_help_str(limit):
                    problems.append((name, limit, listed.get_short_help_str(limit),
                                     commands[name].get_short_help_str(limit)))
                    break
        eager = click.Group("oncoscope", commands=commands, help=main.help, params=main.params)
        for width in (40, 60, 80, 120, 200):
            texts = []
            for group in (main, eager):
                c = click.Context(group, info_name="oncoscope", terminal_width=width)
                texts.append(group.get_help(c))
            if texts[0] != texts[1]:
                problems.append(("--help", width, texts[0], texts[1]))
        print(problems)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]", p.stdout


def test_every_command_is_listed():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    listed = [line.split()[0] for line in r.output.split("Commands:\n")[1].splitlines() if line.strip()]
    assert listed == sorted(COMMANDS)


def test_a_command_whose_module_is_not_installed_is_left_out_like_an_unknown_one(tmp_path, monkeypatch):
    """As `oncoscope bench` in a deployment without oncoscope/bench/: the rest works; a dependency
    missing inside a module that is there is an error, not a silently missing command."""
    (tmp_path / "broken_command_module.py").write_text("import no_such_dependency_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    @click.group(cls=LazyGroup, lazy_commands={
        "ghost": ("oncoscope.not_installed.command:ghost", "A command whose package is absent."),
        "db": ("oncoscope.cli.db:db", "Database schema migrations (Alembic)."),
        "broken": ("broken_command_module:cmd", "A command whose dependency is absent.")})
    def group():
        """Test group."""

    r = CliRunner().invoke(group, ["--help"])
    assert r.exit_code == 0 and "ghost" not in r.output and "db " in r.output and "broken" in r.output
    r = CliRunner().invoke(group, ["ghost"])
    assert r.exit_code == 2 and "No such command 'ghost'" in r.output
    assert CliRunner().invoke(group, ["db", "--help"]).exit_code == 0
    r = CliRunner().invoke(group, ["broken"])
    assert isinstance(r.exception, ModuleNotFoundError) and r.exception.name == "no_such_dependency_x"
