"""Requests/s and latency of the OpenAI-compatible server (`python -m pdpo_jax.serve`) under N
concurrent clients on loopback.

    .venv/bin/python bench/bench_server.py [--concurrency 1,4,16] [--requests 64]
        [--max-tokens 32] [--prompt-len 96] [--slots 16] [--dtype float32] [--results DIR]
        [--wait-quiet S] [--retries 2]

Model: the anchor Llama (common.MODELS["anchor"]: d=256, ff=688, 4 layers, 4 heads, vocab 8000,
untied), random weights (torch seed 0, built as bench_sampler builds it), saved with the GPT-2
tokenizer (../shared/data/tokenizers/gpt2, `--tokenizer`): its ids below 8000 decode to text and
its EOS (50256) lies outside the model's vocabulary, so every reply is exactly `--max-tokens`
tokens long. The server is the command a user runs, in its own process:
`python -m pdpo_jax.serve --checkpoint <tmp> --port 0 --slots 16 --max-model-len 256` (fp32,
`--max-top-k 50`, 8 decode steps per engine call: the defaults).

Requests: POST /v1/completions, each with its own 96-token prompt of random ids (numpy seed 1)
and seed, max_tokens 32, temperature 0.7, top_p 0.9: the engine path of a chat request without
the template. Clients: N threads, each with its own keep-alive `httpx.Client`, sending requests
back to back until `--requests` were sent in all (at least 2 per client).

Timed, per concurrency: a plain pass (latency = send -> whole JSON body) and a streamed pass
(`stream: true`; time to first token = send -> first text chunk; latency = send -> [DONE]).
req/s = requests / pass wall time; new tok/s = completion tokens / wall. Before timing, bursts
of 1..slots simultaneous requests compile every admission batch size, and one untimed pass per
concurrency warms the rest. CPU shares over each pass (from /proc): the server's, the clients'
(this process), and other processes'.

Prints progress on stderr and writes bench/results/server-<stamp>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# bench_dpo (wait_quiet, NOISY; light imports) puts the repository on sys.path and imports
# common first, which sets the offline variables before anything loads transformers.
import bench_dpo
import common

from pdpo_jax import tables

REPO = os.path.dirname(HERE)
GPT2 = os.path.join(REPO, "..", "shared", "data", "tokenizers", "gpt2")
NAME = "anchor"


def build_checkpoint(folder: str, tokenizer: str) -> None:
    """The anchor Llama (random, torch seed 0) and the GPT-2 tokenizer in `folder`."""
    import transformers
    from torch_dpo import build_model
    build_model("anchor", seed=0).save_pretrained(folder)
    transformers.GPT2TokenizerFast.from_pretrained(tokenizer).save_pretrained(folder)


class Server:
    """`python -m pdpo_jax.serve` in a subprocess; `url` once it listens; SIGINT to stop."""

    def __init__(self, folder: str, args, log_path: str):
        cmd = [sys.executable, "-m", "pdpo_jax.serve", "--checkpoint", folder, "--port", "0",
               "--served-model-name", NAME, "--slots", str(args.slots), "--max-model-len",
               str(args.max_model_len), "--dtype", args.dtype]
        self.command = " ".join(cmd[1:])
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PDPO_LOG="WARNING")
        # Both streams to a file: a pipe nobody drains would block the server once full
        # (uvicorn writes its access log to stdout). The child holds its own descriptor.
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        line = _serving_line(self.proc, log_path, args.start_timeout)
        if line is None:
            self.stop()
            with open(log_path) as fh:  # the log's folder is removed on exit: show its end
                tail = fh.read()[-3000:]
            sys.exit(f"the server did not start within {args.start_timeout} s; its output "
                     f"ended:\n{tail}")
        self.url = line.rsplit(" at ", 1)[1].strip().removesuffix("/v1")

    def cpu_s(self) -> float:
        """user + system CPU seconds of the server process so far."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float | None:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _serving_line(proc: subprocess.Popen, log_path: str, timeout: float) -> str | None:
    """The server's 'serving ... at URL' line once it is in the log, or None (it exited or
    `timeout` s passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with open(log_path) as fh:
            line = next((x for x in fh if x.startswith("serving ")), None)
        if line is not None:
            return line
        time.sleep(0.2)
    return None


def request_body(prompt: list[int], seed: int, args, stream: bool) -> dict:
    body = {"model": NAME, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.7,
            "top_p": 0.9, "seed": seed, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def one_request(http, url: str, body: dict) -> dict:
    """Sends one request; latency, time to first text (streamed), completion tokens."""
    start = time.perf_counter()
    if not body["stream"]:
        response = http.post(url + "/v1/completions", json=body)
        response.raise_for_status()
        usage = response.json()["usage"]
        return {"latency_s": time.perf_counter() - start, "tokens": usage["completion_tokens"]}
    first, tokens = None, None
    with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency_s": time.perf_counter() - start, "ttft_s": first, "tokens": tokens}


def run_pass(url: str, prompts, concurrency: int, requests: int, args, stream: bool) -> dict:
    """`requests` requests from `concurrency` clients sending back to back."""
    import httpx
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> list[dict]:
        out = []
        with httpx.Client(timeout=args.request_timeout) as http:
            while True:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return out
                body = request_body(prompts[k % len(prompts)], 1000 + k, args, stream)
                try:
                    out.append(one_request(http, url, body))
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    out.append({"error": f"{type(e).__name__}: {e}"})

    with futures.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = [r for rs in pool.map(lambda _: client(), range(concurrency)) for r in rs]
        wall = time.perf_counter() - start
    return {"wall_s": wall, "results": results}


def summarise(concurrency: int, stream: bool, timed: dict, cpu: dict) -> dict:
    import numpy as np
    ok = [r for r in timed["results"] if "error" not in r]
    lat = np.asarray([r["latency_s"] for r in ok]) * 1e3
    row = dict(concurrency=concurrency, mode="stream" if stream else "plain",
               requests=len(timed["results"]), errors=len(timed["results"]) - len(ok),
               wall_s=round(timed["wall_s"], 3), req_per_s=round(len(ok) / timed["wall_s"], 2),
               new_tok_per_s=round(sum(r["tokens"] for r in ok) / timed["wall_s"], 1),
               latency_p50_ms=round(float(np.percentile(lat, 50)), 1),
               latency_p95_ms=round(float(np.percentile(lat, 95)), 1), **cpu)
    if stream:
        ttft = np.asarray([r["ttft_s"] for r in ok if r.get("ttft_s") is not None]) * 1e3
        row.update(ttft_p50_ms=round(float(np.percentile(ttft, 50)), 1),
                   ttft_p95_ms=round(float(np.percentile(ttft, 95)), 1))
    return row


def cpu_shares(server: Server, before: tuple | None = None):
    """(machine busy, steal, total, server, client) ticks now; with `before`, the shares of the
    machine's CPU time (busy excludes idle, iowait and steal, as common.Meter counts it)."""
    total, busy, steal = common.cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    now = (busy, steal, total, server.cpu_s() * hz, sum(os.times()[:2]) * hz)
    if before is None:
        return now
    busy, steal, total, srv, cli = (a - b for a, b in zip(now, before))
    total = max(total, 1)
    return {"server_cpu_frac": round(srv / total, 3), "client_cpu_frac": round(cli / total, 3),
            "others_cpu_frac": round(max(0.0, (busy - srv - cli) / total), 3),
            "cpu_steal_frac": round(steal / total, 3)}


def timed_pass(server: Server, prompts, concurrency: int, stream: bool, args) -> dict:
    """One timed pass, after waiting (at most --wait-quiet s) for a quiet machine; timed again
    (after up to 60 s of waiting) while other processes took over NOISY of the CPUs, at most
    --retries times. The row is the least noisy attempt; the others' numbers stay in it."""
    attempts = []
    for attempt in range(args.retries + 1):
        quiet = args.wait_quiet if attempt == 0 else max(args.wait_quiet, 60)
        waited = bench_dpo.wait_quiet(quiet) if quiet > 0 else 0.0
        before = cpu_shares(server)
        timed = run_pass(server.url, prompts, concurrency, max(args.requests, 2 * concurrency),
                         args, stream)
        row = summarise(concurrency, stream, timed, cpu_shares(server, before))
        row["waited_for_quiet_s"] = waited
        attempts.append(row)
        common.log(f"  c={concurrency:>2} {row['mode']:>6}: {row['req_per_s']:.2f} req/s, "
                   f"{row['new_tok_per_s']:.0f} tok/s, p50 {row['latency_p50_ms']:.0f} ms, p95 "
                   f"{row['latency_p95_ms']:.0f} ms, errors {row['errors']}, others "
                   f"{row['others_cpu_frac']:.0%}")
        if row["others_cpu_frac"] <= bench_dpo.NOISY:
            break
    best = min(attempts, key=lambda r: r["others_cpu_frac"])
    best["other_attempts"] = [{k: r[k] for k in ("others_cpu_frac", "req_per_s", "latency_p50_ms",
                                                 "latency_p95_ms")}
                              for r in attempts if r is not best]
    return best


def warm_up(url: str, prompts, args) -> float:
    """Bursts of 1..slots simultaneous requests (every admission batch size compiles), then
    one short untimed pass per concurrency; returns the seconds it took."""
    start = time.perf_counter()
    for burst in range(1, args.slots + 1):
        run_pass(url, prompts, burst, burst, args, stream=False)
    for c in args.concurrency:
        run_pass(url, prompts, c, 2 * c, args, stream=bool(c % 2))
    return time.perf_counter() - start


def measure(args) -> dict:
    import numpy as np
    vocab = common.MODELS["anchor"]["vocab_size"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, vocab, args.prompt_len).tolist() for _ in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        folder = os.path.join(tmp, "anchor")
        build_checkpoint(folder, args.tokenizer)
        started = time.perf_counter()
        server = Server(folder, args, os.path.join(tmp, "server.log"))
        out = {"server_command": server.command,
               "start_s": round(time.perf_counter() - started, 1)}
        try:
            out["warmup_s"] = round(warm_up(server.url, prompts, args), 1)
            common.log(f"server up in {out['start_s']} s, warmed up in {out['warmup_s']} s")
            out["rows"] = [timed_pass(server, prompts, c, stream, args)
                           for c in args.concurrency for stream in (False, True)]
            out["server_peak_rss_mib"] = round(server.peak_rss_mib() or 0, 1)
        finally:
            out["server_exit"] = server.stop()
    return out


COLUMNS = ["clients", "mode", "requests", "req/s", "new tok/s", "p50 ms", "p95 ms",
           "TTFT p50 ms", "TTFT p95 ms", "errors", "server CPU", "clients CPU", "others", "steal"]


def markdown(result: dict) -> str:
    h = result["host"]
    setup = (
        f"`{result['command']}` — {result['total_wall_s']:.0f} s. "
        f"Server: `{result['server_command']}` (up in {result['start_s']} s, warm-up "
        f"{result['warmup_s']} s, peak RSS {result['server_peak_rss_mib']} MiB). Model: the anchor "
        f"Llama (d=256, ff=688, 4 layers, vocab 8000, random weights), {result['dtype']}. "
        f"Requests: /v1/completions, {result['prompt_len']}-token prompts, exactly "
        f"{result['max_tokens']} new tokens, temperature 0.7, top-p 0.9, a seed each; N clients "
        f"back to back on loopback. CPU: {h['cpu']} (family {h.get('cpu_family')}, model "
        f"{h.get('cpu_model')}), {h['cpus']} cores, shared by the server and the clients.")
    legend = (
        "req/s and new tok/s = over the pass's wall time; latency = send → whole reply (plain) "
        "or → [DONE] (stream); TTFT = send → first text chunk. CPU shares over the pass: of the "
        "machine's cores (`others` = processes other than the server and the clients; a pass "
        f"above {bench_dpo.NOISY:.0%} is timed again, at most --retries times, and the least "
        "noisy attempt is shown).")
    lines = [f"# Server benchmark {result['stamp']}", "", setup, "", legend, ""]
    rows = [[r["concurrency"], r["mode"], r["requests"], r["req_per_s"], r["new_tok_per_s"],
             r["latency_p50_ms"], r["latency_p95_ms"], r.get("ttft_p50_ms", "–"),
             r.get("ttft_p95_ms", "–"), r["errors"], f"{r['server_cpu_frac']:.0%}",
             f"{r['client_cpu_frac']:.0%}", f"{r['others_cpu_frac']:.0%}",
             f"{r['cpu_steal_frac']:.0%}"]
            for r in result["rows"]]
    lines.append(tables.markdown_table(COLUMNS, rows))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=64, help="requests per timed pass")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--tokenizer", default=GPT2, help="tokenizer folder saved with the model")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed pass wait up to S s for a quiet machine")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-time a pass while others used > 10%% of the CPUs")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    result = {"bench": "server", "stamp": stamp,
              "command": "bench/bench_server.py " + " ".join(sys.argv[1:]), "model": NAME,
              "dtype": args.dtype, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "slots": args.slots, "host": common.host()}
    result.update(measure(args))
    result["total_wall_s"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, f"server-{stamp}")
    with open(base + ".json", "w") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    with open(base + ".md", "w") as fh:
        fh.write(markdown(result))
    common.log(f"wrote {base}.json and {base}.md")
    print(json.dumps({k: result[k] for k in ("stamp", "rows")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
