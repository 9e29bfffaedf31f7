"""What every command-line entry point shares (`pdpo_jax.cli.run_cli`), in a process of its own;
a user's mistake as one line is tested per command (test_config, test_models_gguf, ...)."""
import os
import signal
import subprocess
import sys


def _abort(code: str) -> subprocess.CompletedProcess:
    """Runs `code`, which aborts, in a fresh interpreter without a core file or an inherited
    PYTHONFAULTHANDLER."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    no_core = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    return subprocess.run([sys.executable, "-c", no_core + code], capture_output=True, text=True,
                          env=env, timeout=120)


def test_a_native_crash_prints_every_threads_python_stack():
    """An abort below Python (as one was in a test worker, in the serving engine's thread)
    kills the process, but first the stack of each Python thread reaches stderr: here the main
    thread's, inside run_cli, and a second thread's, inside its own function."""
    code = ("import os, threading, time\n"
            "from pdpo_jax.cli import run_cli\n"
            "def engine_thread(): time.sleep(60)\n"
            "threading.Thread(target=engine_thread, daemon=True).start()\n"
            "run_cli(os.abort)\n")
    done = _abort(code)
    assert done.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in done.stderr, done.stderr
    assert "in run_cli" in done.stderr and "in engine_thread" in done.stderr, done.stderr


def test_without_run_cli_the_same_crash_is_silent():
    """The control: the same abort without run_cli prints no stack (what a crashed server or
    training run showed before)."""
    done = _abort("import os; os.abort()")
    assert done.returncode == -signal.SIGABRT and "Fatal Python error" not in done.stderr
