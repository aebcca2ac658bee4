"""What the command-line entry points share."""

from __future__ import annotations

import atexit
import importlib.machinery
import importlib.util
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags, logging

INTERRUPTED = 128 + 2  # the exit status of a program stopped by SIGINT, as shells report it


def run_program(main: Callable[[list[str]], Any], interrupted: Callable[[], str]) -> None:
    """absl's ``app.run`` with :func:`parse_flags`, ended by Ctrl-C as :func:`exit_on_ctrl_c`
    says."""
    exit_on_ctrl_c(lambda: app.run(main, flags_parser=parse_flags), interrupted)


def exit_on_ctrl_c(run: Callable[[], Any], interrupted: Callable[[], str]) -> Any:
    """``run()``; Ctrl-C that reaches here ends the program with one line (``interrupted()``:
    what it means for the user's files) and exit status 130, not a traceback. The
    interpreter's teardown is skipped (exit handlers still run): after an interrupted XLA
    compilation it can crash in XLA's destructors."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): {interrupted()}", file=sys.stderr)
        logging.flush()
        atexit._run_exitfuncs()  # what a normal exit runs; then no teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)


def leave_ctrl_c_to_the_main_process(*_: object) -> None:
    """In a worker process (grain's data workers, ingest's pool): a terminal's Ctrl-C reaches
    the whole process group, and the main process answers it and stops its workers; a worker
    answering too would print a traceback, or die holding a lock the shutdown waits on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def incomplete_output(flag: str) -> Callable[[], str]:
    """``run_program``'s message for a program whose ``--flag`` names a new directory or file."""
    return lambda: incomplete(f"--{flag} {getattr(flags.FLAGS, flag)}")


def incomplete(output: str) -> str:
    return f"{output}, if it was made, is incomplete: remove it before running the command again"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with one-line errors for a bad flag, a bad ``--config.field=value``
    override, a config file that cannot be loaded and a positional argument (none is taken)."""
    try:
        argv = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e)
        if isinstance(e, AttributeError) and "get_config" in message:  # a file without one
            sys.exit(f"error: --config {_config_spec(argv)}: defines no get_config() function")
        if "Error whilst parsing config file" in message:  # get_config(arg) raised
            spec = message.partition(": ")[0].removeprefix("flag --config=")
            sys.exit(f"error: --config {spec}: {_last_line(message)}")
        message = message.replace("\\n", " ").replace("\\", "").replace("'", "")
        if message.startswith("flag --config=None:") and (spec := _config_spec(argv)):
            sys.exit(f"error: --config {spec}: get_config() returned None")
        if message.startswith("flag --") and not message.startswith("flag --config."):
            sys.exit(f"error: {message}")  # a plain flag: --workdir, --stop_after, ...
        sys.exit(f"error: invalid --config override: {message}")
    except Exception as e:  # the config file itself: a syntax error, a failed import, ...
        sys.exit(f"error: cannot load --config {_config_spec(argv)}: {_describe_load_error(e)}")
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
        config = flags.FLAGS["config"]
        try:
            config.value.keys()  # ml_collections defers a load error to the first access
        except OSError as e:
            path = config.config_filename.partition(":")[0]
            if not os.path.isfile(path):
                sys.exit(f"error: config file {path!r} does not exist")
            sys.exit(f"error: cannot load --config {config.config_filename}: {_last_line(e)}")
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}: flags take the form --name=value")
    return argv


def _config_spec(argv: list[str]) -> str | None:
    """The value of ``--config`` in a command line (the last one given), if any."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.partition("=")[2]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _describe_load_error(error: BaseException) -> str:
    """One line for an error raised while a config file was executed."""
    if isinstance(error, SyntaxError):  # the message alone does not say where
        return f"{type(error).__name__} at {error.filename}:{error.lineno}: {error.msg}"
    return f"{type(error).__name__}: {_last_line(error)}"


def _last_line(error: BaseException | str) -> str:
    """The last line of an error's root cause, as Python prints it, less the exception type."""
    while isinstance(error, BaseException) and error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return re.sub(r"^\w+Error: ", "", lines[-1].strip()) if lines else repr(error)


def start_jax(distributed_mode: str = "off") -> None:
    """What a program does before its first JAX computation: the CPU runtime settings (some
    must precede the backend's start), then joining the distributed runtime per
    ``distributed_mode`` (``usfm_jax.distributed.MODES``)."""
    # imported here: programs without JAX (the ingest, which forks its workers) never load it
    from usfm_jax import cpu_runtime, distributed

    try:
        cpu_runtime.execute_inline()
    except ValueError as e:  # a bad USFM_CPU_RUNTIME
        sys.exit(f"error: {e}")
    distributed.initialize(distributed_mode)
    cpu_runtime.configure_for_backend()


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of ``"path/to/config.py[:arg]"``, as ``--config=...`` would load it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "usfm_config_" + os.path.splitext(os.path.basename(path))[0]
    try:
        loader = importlib.machinery.SourceFileLoader(name, path)  # whatever the suffix
        module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise ValueError(f"cannot load config {spec}: {_describe_load_error(e)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config {spec}: get_config() returned {type(config).__name__}")
    return config


def exit_if_out_of_memory(error: Exception) -> None:
    """Ends the program with a one-line error when ``error`` is XLA running out of device
    memory (a predictable mistake: a batch or model too large for the device)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "RESOURCE_EXHAUSTED" in first:
        sys.exit(
            f"error: {first[:300]}. Lower config.batch_size, or trade compute for memory: "
            "config.optimizer.grad_accum_steps=N, config.model.remat=dots (docs: README, "
            "Devices, hosts and memory)"
        )
