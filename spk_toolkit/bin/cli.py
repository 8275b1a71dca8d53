"""Shared CLI plumbing: ``--config file.yaml`` whose keys are long option names (unknown keys are errors)."""
from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys
from typing import Callable, Optional, Sequence


def str2bool(v: str) -> bool:
    """Parse ``true/false/1/0/yes/no`` (argparse type)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes", "y"):
        return True
    if v.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from ``--config`` (YAML mapping of long option names).

    Command-line flags override the config file. Raises ``SystemExit`` (via ``parser.error``) for a config key
    that is not an option of ``parser``, naming the key and the file.
    """
    import yaml

    if parser.formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter,
                                  argparse.ArgumentDefaultsHelpFormatter):
        parser.formatter_class = HelpFormatter  # defaults (and choices) shown for every option
    for a in parser._actions:  # argparse prints nothing for an option without help text, not even its default
        if a.help is None and a.option_strings and a.default not in (None, argparse.SUPPRESS) and not a.required:
            a.help = "(default: %(default)s)"
    parser.add_argument("--config", help="YAML file whose keys are long option names (command line wins); a "
                        "bundled default config by name (e.g. inference, parallel_local) when no such file exists")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        pre.config = resolve_config(pre.config)
        try:
            with open(pre.config, encoding="utf-8-sig") as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as e:
            parser.error(f"--config {pre.config}: cannot read it ({e.strerror or e})")
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            parser.error(f"--config {pre.config}: not valid YAML ({' '.join(str(e).split())})")
        if not isinstance(cfg, dict):
            parser.error(f"{pre.config}: expected a mapping of option names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            parser.error(f"{pre.config}: unknown option(s) {', '.join(unknown)}")
        actions = {act.dest: act for act in parser._actions}
        for k, v in cfg.items():
            if isinstance(v, list) and k not in ("trials",):
                v = ",".join(map(str, v))
            # through the option's argparse type, as on the command line: a nan in the YAML is refused naming
            # the option, like --shard_duration nan
            cfg[k] = _config_value(actions[k], v)
            choices = actions[k].choices
            if choices is not None and actions[k].type is None and cfg[k] is not None and cfg[k] not in choices:
                parser.error(f"{pre.config}: {k}: invalid choice {cfg[k]!r} (choose from "
                             f"{', '.join(map(repr, choices))})")
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's layout and shows every option's default (choices show as ``{a,b}``).

    Unlike :class:`argparse.ArgumentDefaultsHelpFormatter`, options without a help text show their default too;
    required options, flags whose default is None and ``--help`` itself do not.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        names = getattr(action, "registry_names", None)
        if names is not None:  # read from the registry only when help is printed (it imports the modules)
            text = f"{text} (registered: {', '.join(names())})".replace("%", "%%").replace("%%(", "%(")
        if ("%(default)" in text or action.default in (None, argparse.SUPPRESS) or action.required
                or not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


def registry_help(action: argparse.Action, names: Callable[[], Sequence[str]]) -> argparse.Action:
    """Make ``--help`` list ``names()`` after ``action``'s help text: the names of a registry (built-ins and
    plug-ins), read only when help is printed (:class:`HelpFormatter`), since filling a registry imports its
    modules. Returns ``action``."""
    action.registry_names = names
    return action


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """Add ``-v/--verbose`` (repeatable) and ``-q/--quiet`` (see :func:`setup_logging`)."""
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: INFO messages and third-party warnings and logs on stderr; -vv: DEBUG")
    p.add_argument("-q", "--quiet", action="store_true", default=False,
                   help="errors only on stderr, no progress bar; results and where they went are still printed")


#: loggers of the package (and its CLIs, named after the command); everything else is third-party
OWN_LOGGERS = ("spk_toolkit", "spk_inference", "spk_score", "spk_train", "spk_embed_extract", "cache_features",
               "extract_spk_embed", "__main__")


def _is_own(record: logging.LogRecord) -> bool:
    import os

    name = record.name
    if name == "py.warnings":  # a captured warnings.warn: "path:line: Category: message"
        return str(record.args[0] if record.args else record.msg).startswith(_PKG_DIR + os.sep)
    if any(name == n or name.startswith(n + ".") for n in OWN_LOGGERS):
        return True
    return name == "root" and str(record.pathname).startswith(_PKG_DIR + os.sep)


def _pkg_dir() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_PKG_DIR = _pkg_dir()


class _StderrFilter(logging.Filter):
    """Default verbosity: our own records at the handler's level, third-party records only from ERROR up."""

    def __init__(self, third_party: bool):
        super().__init__()
        self.third_party = third_party

    def filter(self, record: logging.LogRecord) -> bool:
        return self.third_party or record.levelno >= logging.ERROR or _is_own(record)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Configure logging and warnings for a CLI run.

    * stderr: our messages at WARNING (default), INFO (``-v``), DEBUG (``-vv``) or ERROR (``--quiet``);
      third-party log records and third-party warnings (``DeprecationWarning``, ``FutureWarning``, ``UserWarning``
      of our dependencies) only with ``-v``: at default verbosity no line from a third-party logger appears, only
      its errors.
    * Dask's own logging (scheduler, nanny, worker processes, which read ``DASK_LOGGING__DISTRIBUTED``) is set to
      ``error`` unless verbose.
    * Everything (INFO and up, third-party included) also goes to ``run.log`` once :func:`open_run_log` is called.

    Parameters
    ----------
    verbose : int
        Count of ``-v``.
    quiet : bool
        ``--quiet``.
    """
    import os
    import warnings

    level = logging.ERROR if quiet else logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 \
        else logging.DEBUG
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_spk_stderr", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._spk_stderr = True
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_StderrFilter(third_party=verbose > 0))
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))  # INFO reaches run.log whatever stderr shows
    logging.captureWarnings(True)  # warnings become log records: run.log, and stderr only if they are ours or -v
    if verbose > 0:
        warnings.simplefilter("default")  # -v: deprecation warnings of our dependencies too, once each
    else:
        # Python's default filters already hide DeprecationWarning outside __main__ (also at interpreter exit,
        # where logging is gone); worker processes (Dask, DataLoader) get the same through the environment
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
        try:  # dask may already be imported (a library caller); its config then needs the same setting
            if "dask" in sys.modules:
                import dask

                dask.config.set({"logging.distributed": "error"})
        except Exception:  # pragma: no cover - an optional dependency's config
            pass


class RunLogHandler(logging.handlers.WatchedFileHandler):
    """Appends to ``<output_dir>/run.log``, starting with a header line; reopens the file, header first, when it
    was removed meanwhile (``--overwrite`` removes the previous run's log with its other outputs)."""

    def __init__(self, path, header: str):
        self.header = header
        # opened (and its directory created) at the first record: a run refused while its inputs are checked
        # writes nothing into --output_dir
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):
        import os

        os.makedirs(os.path.dirname(os.path.abspath(self.baseFilename)), exist_ok=True)
        f = super()._open()
        st = os.fstat(f.fileno())  # what WatchedFileHandler compares with, so a lazy first open is not "moved"
        self.dev, self.ino = st.st_dev, st.st_ino
        f.write(self.header)
        f.flush()
        return f


def open_run_log(output_dir, prog: str, argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """Log this run to ``<output_dir>/run.log`` (appended; INFO and up, third-party records and warnings included).

    The first lines of each run name the command, host, pid and time. ``--overwrite`` removes the previous
    run's ``run.log`` with the rest of its outputs: the log then starts again with this run's header.

    Parameters
    ----------
    output_dir : path
        Created when missing, at the first log record (not before: a run refused while its inputs are checked
        leaves nothing behind).
    prog : str
        The command's name.
    argv : sequence of str, optional
        Its arguments (default ``sys.argv[1:]``).

    Returns
    -------
    str or None
        The log file, or None when it cannot be written (a warning says why; the run goes on).
    """
    import datetime
    import os
    import shlex
    import socket

    from spk_toolkit.io.rundir import RunDir

    path = os.fspath(RunDir(output_dir).log_path)
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, RunLogHandler)]:
        root.removeHandler(h)
        h.close()
    args = list(sys.argv[1:] if argv is None else argv)
    header = (f"==== {datetime.datetime.now().isoformat(timespec='seconds')} {socket.gethostname()} pid "
              f"{os.getpid()}: {prog} {shlex.join(args)}\n")
    try:
        handler = RunLogHandler(path, header)
    except OSError as e:
        logging.getLogger(prog).warning("cannot write %s (%s); logging to stderr only", path, e)
        return None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return path


def echo(logger: logging.Logger, quiet: bool = False):
    """A ``print``-like callable for a library's progress lines: printed (unless ``quiet``) and logged at INFO
    (so they reach ``run.log``)."""

    def _echo(msg: str) -> None:
        if not quiet:
            print(msg)
        logger.info("%s", msg)

    return _echo


def resolve_config(path: Optional[str]) -> Optional[str]:
    """``path`` itself when it exists, else the bundled default config of that name (``conf/<name>.yaml`` inside
    the package), else ``path`` unchanged (the caller reports the missing file).

    ``parallel_local``, ``parallel_local.yaml`` and ``conf/parallel_local.yaml`` all find the bundled
    ``parallel_local.yaml`` when no such file exists where the command runs.

    Parameters
    ----------
    path : str or None
        What the user gave (``--config``, ``--parallel``).

    Returns
    -------
    str or None
    """
    import os

    if not path or os.path.exists(path):
        return path
    name = os.path.basename(path)
    for cand in (name, name + ".yaml"):
        p = os.path.join(_PKG_DIR, "conf", cand)
        if os.path.isfile(p):
            return p
    return path


def add_extraction_options(p: argparse.ArgumentParser, output_format: str = "npz") -> None:
    """Add the engine's run options shared by every extraction CLI (``spk_inference``, ``cache_features``).

    Batching and decoding (``--batch_bins``, ``--num_workers``, ``--torch_threads``, ``--model_streams``),
    storage (``--output_format``), the error policy (``--on_error``, ``--max_errors``, ``--min_duration``,
    ``--allow_pipes``), shards and resume (``--shard_duration``, ``--overwrite``, ``--lock_timeout``), the
    executor (``--executor``, ``--parallel``), ``--device``, ``--progress`` and ``-v``. Defaults come from
    :class:`spk_toolkit.engine.ExtractOptions`; choices from the registries. :func:`extraction_options` turns
    the parsed values back into engine options.

    Parameters
    ----------
    p : argparse.ArgumentParser
    output_format : str
        Default of ``--output_format`` (``npz`` for embeddings, ``hdf5`` for feature caches).
    """
    from spk_toolkit.engine import ExtractOptions
    from spk_toolkit.io.storage import storage_names
    from spk_toolkit.parallel import executor_names

    d = ExtractOptions()
    p.add_argument("--device", default="cpu", type=device_type,
                   help="cpu, cuda, cuda:N, auto (torchrun ranks use their local rank)")
    p.add_argument("--batch_bins", type=option_type("batch_bins", int), default=d.batch_bins, help="padded samples per batch (B*T)")
    p.add_argument("--num_workers", type=option_type("num_workers", int), default=d.num_workers, help="decoding DataLoader workers")
    registry_help(p.add_argument("--output_format", default=output_format, type=option_type("output_format", str),
                                 help="comma list of storage formats (aliases: ark, h5, npy)"), storage_names)
    p.add_argument("--on_error", choices=["skip", "raise"], default=d.on_error)
    p.add_argument("--max_errors", type=option_type("max_errors", int), default=d.max_errors, help="-1 = no limit")
    p.add_argument("--min_duration", type=option_type("min_duration"), default=d.min_duration, help="seconds")
    p.add_argument("--allow_pipes", type=str2bool, default=False, help="run wav.scp 'cmd |' entries")
    p.add_argument("--shard_duration", type=option_type("shard_duration"), default=d.shard_duration, help="seconds of audio per shard")
    p.add_argument("--torch_threads", type=option_type("torch_threads", int), default=0, help="model intra-op threads (0 = torch default)")
    p.add_argument("--model_streams", type=option_type("model_streams", int), default=d.model_streams,
                   help="concurrent model forwards, each with torch_threads/model_streams threads (CPU: try 2)")
    p.add_argument("--overwrite", type=str2bool, default=False,
                   help="remove every output of a previous run in output_dir first")
    p.add_argument("--lock_timeout", type=option_type("lock_timeout"), default=d.lock_timeout,
                   help="seconds to wait for another run holding output_dir (0 = refuse, -1 = wait)")
    p.add_argument("--executor", default=None, choices=executor_names(),
                   help="inprocess (default), torchrun (chosen automatically under torchrun), dask (--parallel)")
    p.add_argument("--parallel", default=None,
                   help="Dask parallel config YAML (env: local|local_gpu|slurm|pbs|sge, n_workers, options)")
    p.add_argument("--progress", type=str2bool, default=True, help="tqdm progress bar (off with --quiet)")
    p.add_argument("--segment_overrun", choices=["error", "clip"], default=d.segment_overrun,
                   help="a segments entry running past the end of its file: an error, or embed what exists")
    p.add_argument("--header_timeout", type=option_type("header_timeout"), default=d.header_timeout,
                   help="seconds one audio header read of the planning pass may take")
    p.add_argument("--pipe_timeout", type=option_type("pipe_timeout"), default=d.pipe_timeout,
                   help="seconds a wav.scp 'cmd |' pipe may run before it is killed")
    p.add_argument("--worker_timeout", type=option_type("worker_timeout"), default=d.worker_timeout,
                   help="seconds without a batch from the decoding workers before the run stops (0 = no limit)")
    p.add_argument("--max_chunk_duration", type=option_type("max_chunk_duration"), default=d.max_chunk_duration,
                   help="0 = whole utterances; S = embed utterances longer than S seconds in equal chunks of at most "
                        "S s and store the length-weighted mean (bounds model memory; changes long embeddings)")
    p.add_argument("--output_stem", type=option_type("output_stem", str), default=d.output_stem,
                   help="file stem of the embedding output (<stem>.npz, <stem>.scp, ...)")
    add_verbosity(p)


def device_type(text: str) -> str:
    """The argparse ``type`` of ``--device``: :func:`spk_toolkit.backends.device.parse_device` (spelling only; the
    device's presence is checked before the corpus is read), its message as argparse's."""
    from spk_toolkit.backends.device import parse_device

    try:
        return parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def extraction_options(args: argparse.Namespace) -> dict:
    """The :class:`spk_toolkit.engine.ExtractOptions` fields of :func:`add_extraction_options` from parsed args."""
    return dict(batch_bins=args.batch_bins, num_workers=args.num_workers, output_format=args.output_format,
                on_error=args.on_error, max_errors=args.max_errors, min_duration=args.min_duration,
                allow_pipes=args.allow_pipes, shard_duration=args.shard_duration, overwrite=args.overwrite,
                progress=args.progress and not getattr(args, "quiet", False), torch_threads=args.torch_threads, model_streams=args.model_streams,
                lock_timeout=args.lock_timeout, segment_overrun=args.segment_overrun,
                header_timeout=args.header_timeout, pipe_timeout=args.pipe_timeout,
                worker_timeout=args.worker_timeout,
                max_chunk_duration=args.max_chunk_duration, output_stem=args.output_stem)


def choose_executor(executor, parallel, prog: str) -> str:
    """The executor of a CLI run: as given, ``dask`` with ``--parallel``, ``torchrun`` when launched by torchrun.

    A torchrun launch (``RANK``/``WORLD_SIZE`` set) is detected here, explicitly, and logged; a malformed
    ``WORLD_SIZE`` is an error (raised as ValueError naming the variable), never a silent single process.
    """
    from spk_toolkit.parallel import torchrun_launch

    launch = torchrun_launch()
    if executor is None and parallel is None and launch is not None and launch["world_size"] > 1:
        logging.getLogger(prog).info("torchrun launch detected (rank %d of %d, local rank %d): executor torchrun",
                                     launch["rank"], launch["world_size"], launch["local_rank"])
        return "torchrun"
    if parallel is not None:  # checked before any work (a YAML error names file:line:column)
        from spk_toolkit.parallel.dask import load_parallel_config

        load_parallel_config(parallel)
    return executor or ("dask" if parallel else "inprocess")


# ------------------------------------------------------------------------------------------------- exit codes
#: One table of exit codes for every CLI (README, "Exit codes"; docs/bad_input.md).
EXIT_OK = 0
#: The run failed: ``--on_error raise`` met a bad utterance, more than ``--max_errors`` failed, a worker failed,
#: the output directory is in use by another run or holds another run's results.
EXIT_FAILED = 1
#: Usage or input error: a bad option or config file, a malformed corpus, trial list, embedding file or
#: checkpoint, an input file that does not exist. Nothing was computed.
EXIT_USAGE = 2
#: The output side failed: the output directory is not a directory, cannot be created, is not writable, or the
#: disk is full (the message names the path and the reason). No temporary file is left; fix it and rerun to
#: resume.
EXIT_OUTPUT = 3
#: Interrupted by Ctrl-C (SIGINT): finished shards are kept, rerun to resume.
EXIT_INTERRUPTED = 130
#: Terminated by SIGTERM (a scheduler's time limit, ``kill``): as SIGINT.
EXIT_TERMINATED = 143

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "the run failed (utterance errors beyond --on_error / --max_errors, a worker failed, the output "
                 "directory is in use or holds another run)",
    EXIT_USAGE: "usage or input error (bad option or config, malformed or missing input file); nothing was computed",
    EXIT_OUTPUT: "output error (output directory not a directory, not writable, disk full: path and reason named); "
                 "rerun after the fix resumes",
    EXIT_INTERRUPTED: "interrupted (SIGINT); rerun to resume",
    EXIT_TERMINATED: "terminated (SIGTERM); rerun to resume",
}


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM while :func:`run_cli` runs (cleans up as Ctrl-C does)."""


def exit_code(exc: BaseException) -> int:
    """The exit code of :data:`EXIT_CODES` for any exception (every failure of a command maps to one).

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    int
        :data:`EXIT_TERMINATED`, :data:`EXIT_INTERRUPTED`; :data:`EXIT_OUTPUT` (an ``OSError`` other than a
        missing input file, or the output-side check); :data:`EXIT_USAGE` (``ValueError`` and its subclasses:
        corpus, trial, embedding, option errors; ``FileNotFoundError`` of an input; a YAML file that does not
        parse; a model package that is not a zip or tar); :data:`EXIT_FAILED` for everything else
        (``ExtractionError``, and any unexpected error: its traceback goes to ``run.log`` and, with ``-v``, to
        stderr).
    """
    import tarfile
    import zipfile

    from spk_toolkit.engine.options import ExtractionError
    from spk_toolkit.io.preflight import OutputDirError

    if isinstance(exc, Terminated):
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ExtractionError):
        return EXIT_FAILED
    if isinstance(exc, OutputDirError):
        return EXIT_OUTPUT
    if isinstance(exc, FileNotFoundError):
        return EXIT_USAGE
    if isinstance(exc, OSError):
        return EXIT_OUTPUT
    if isinstance(exc, (ValueError, ImportError, zipfile.BadZipFile, tarfile.TarError)) or _is_yaml_error(exc):
        return EXIT_USAGE
    return EXIT_FAILED


def _worker_failure(exc: BaseException):
    from spk_toolkit.data import worker_failure

    return worker_failure(exc)


def _is_yaml_error(exc: BaseException) -> bool:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency
        return False
    return isinstance(exc, yaml.YAMLError)


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure the toolkit reports by design (an input, output, run or signal), not a bug:
    anything :func:`exit_code` does not put under "the run failed", plus ``ExtractionError`` and a decoding
    worker's death (:func:`spk_toolkit.data.worker_failure`)."""
    from spk_toolkit.engine.options import ExtractionError

    return (exit_code(exc) != EXIT_FAILED or isinstance(exc, ExtractionError)
            or _worker_failure(exc) is not None)


def describe_exception(exc: BaseException, output_dir=None) -> str:
    """The one line a CLI prints for an expected failure (``filename: reason`` for file-system errors).

    Parameters
    ----------
    exc : BaseException
    output_dir : path-like, optional
        Named for an ``OSError`` that carries no path.

    Returns
    -------
    str
    """
    from spk_toolkit.io.preflight import describe_oserror

    if isinstance(exc, Terminated):
        return "terminated (SIGTERM); finished shards are kept: rerun the same command to resume"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT); finished shards are kept: rerun the same command to resume"
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return describe_oserror(exc, output_dir)
    text = str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename is not None and exc.strerror:
        text = describe_oserror(exc)
    if _is_yaml_error(exc):
        text = _describe_yaml_error(exc)
    if _worker_failure(exc) is not None:  # torch raises a worker's death from its SIGCHLD handler, anywhere
        text = _worker_failure(exc)
    line = " ".join(text.split()) if "\n" not in text.strip() else text.strip().splitlines()[0]
    if not is_expected(exc):
        line = (f"unexpected {type(exc).__name__}: {line or '(no message)'} (a bug: the traceback is in run.log, "
                "or rerun with -v)")
    return line


def _describe_yaml_error(exc) -> str:
    """``file:line:column: problem`` of a PyYAML error (its own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    if mark is None:
        return f"YAML error: {problem}"
    return f"{mark.name}:{mark.line + 1}:{mark.column + 1}: not valid YAML ({problem})"


def _traceback_to_run_log(prog: str, exc: BaseException, always: bool) -> None:
    """Write ``exc``'s traceback to ``run.log`` only (not stderr): when the log is open already, or ``always``
    (an unexpected error; a refused input that has not written anything yet leaves no run.log behind)."""
    if isinstance(exc, KeyboardInterrupt):
        return
    for h in logging.getLogger().handlers:
        if isinstance(h, RunLogHandler) and (always or h.stream is not None):
            h.handle(logging.LogRecord(prog, logging.ERROR, __file__, 0, "%s: %s", (type(exc).__name__, exc),
                                       (type(exc), exc, exc.__traceback__)))


def run_cli(prog: str, body: Callable[[], int], verbose: int = 0, output_dir=None) -> int:
    """Run a CLI's work; map expected failures to one line on stderr and the exit code of :data:`EXIT_CODES`.

    SIGTERM is turned into :class:`Terminated` for the duration (so it unwinds like Ctrl-C: atomic writers
    remove their temporaries, the output directory's lock is released, finished shards stay).

    Parameters
    ----------
    prog : str
        Program name, the start of the message (``spk_inference: error: ...``).
    body : callable
        ``body() -> exit code``.
    verbose : int
        With ``-v`` (>= 1) the traceback is printed before the line.
    output_dir : path-like, optional
        Named in file-system errors that carry no path.

    Returns
    -------
    int
        ``body()``'s code, or the code of the failure.

    Raises
    ------
    SystemExit
        Passes through (argparse's usage errors). Every other exception becomes one line and an exit code
        (:func:`exit_code`); the traceback of an unexpected one is written to ``run.log``, and with ``-v`` to
        stderr.
    """
    import signal
    import threading
    import traceback

    def on_term(signum, frame):
        raise Terminated()

    prev = None
    if threading.current_thread() is threading.main_thread():
        prev = signal.signal(signal.SIGTERM, on_term)
    try:
        return body()
    except BaseException as e:  # noqa: B902 - every failure becomes one line and an exit code
        if isinstance(e, SystemExit):
            raise
        code = exit_code(e)
        _traceback_to_run_log(prog, e, always=not is_expected(e))
        if verbose >= 1:
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {describe_exception(e, output_dir)}", file=sys.stderr)
        return code
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


# ------------------------------------------------------------------------------------------- option checking
def option_type(name: str, convert: Callable = float) -> Callable[[str], object]:
    """An argparse ``type`` for the :class:`~spk_toolkit.engine.ExtractOptions` field ``name``.

    The text is converted (``convert``: ``int``, ``float``, ``str``) and checked by
    :meth:`ExtractOptions.check`, so the ranges live in one place and a bad value is a usage error (exit 2)
    naming the option at parse time: ``argument --shard_duration: shard_duration must be a finite number > 0.0,
    got nan``.

    Parameters
    ----------
    name : str
        Field name.
    convert : callable
        ``str -> value``.

    Returns
    -------
    callable
        ``str -> value``, raising ``argparse.ArgumentTypeError``.
    """

    def parse(text):
        if not isinstance(text, str):
            value = text
        else:
            try:
                value = convert(text.strip())
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"expected {_type_word(convert)}, got {text!r}") from None
        from spk_toolkit.engine.options import ExtractOptions

        try:
            return ExtractOptions.check(name, value)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def _type_word(convert) -> str:
    return {int: "an integer", float: "a number"}.get(convert, getattr(convert, "__name__", "a value"))


def number_type(convert: Callable = float, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False, what: str = "") -> Callable[[str], object]:
    """An argparse ``type`` for a finite number in a range (options that are not engine options).

    Parameters
    ----------
    convert : {int, float}
    lo, hi : float, optional
        Bounds (None = unbounded).
    lo_open, hi_open : bool
        Exclude the bound itself.
    what : str
        Extra words for the message (``"0 = S-norm"``).

    Returns
    -------
    callable
        ``str -> number``, raising ``argparse.ArgumentTypeError`` for text that is not a number, ``nan``,
        ``inf`` or a value out of range.
    """
    import math

    def parse(text):
        try:
            v = convert(str(text).strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {_type_word(convert)}, got {text!r}") from None
        bad = not math.isfinite(v) or (lo is not None and (v < lo or (lo_open and v == lo))) or \
            (hi is not None and (v > hi or (hi_open and v == hi)))
        if bad:
            rng = []
            if lo is not None:
                rng.append(f"{'>' if lo_open else '>='} {lo:g}")
            if hi is not None:
                rng.append(f"{'<' if hi_open else '<='} {hi:g}")
            raise argparse.ArgumentTypeError(f"expected a finite {'integer' if convert is int else 'number'}"
                                             f"{' ' + ' and '.join(rng) if rng else ''}"
                                             f"{' (' + what + ')' if what else ''}, got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


def _config_value(action: argparse.Action, value):
    """A config-file value as the command line would give it, so argparse's ``type`` checks it too."""
    if value is None or action.type is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)
