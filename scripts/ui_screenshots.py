"""Screenshots of the Prefect UI as a new user meets it, from real runs on a real local server.

    python scripts/ui_screenshots.py [--out docs/ui] [--data-dir D] [--chromium /usr/bin/chromium]

Starts `prefect server start` with its UI, the pools and deployments (`Demo` of
scripts/demo_prefect_workers.py), a process worker, then runs `extract-glue` twice through the
deployment:

1. RTE dev in shards of 25 with the bundled MiniLM: `kill -9` of the flow-run processes after 3
   shards, then `prefect flow-run retry` (the demo's check 2: one progress artifact, 100 %);
2. WNLI dev in shards of 25 with a copy of MiniLM whose embedding of one token (one found in one
   example of shard 1 only) is NaN: that shard fails with NonFiniteError, the others commit,
   and the flow run ends Failed naming it.

Then a headless Chromium (Playwright, driving the system's browser: no `playwright install`)
saves PNGs into --out: the runs list, the retried flow run, its progress artifact and the
failed run's shard table. Prints each file and how long each step took.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from demo_prefect_workers import REPO, Demo, _artifact, _flow_run_id, _state, _wait_for

VIEWPORT = {"width": 1400, "height": 900}
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "ui"))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    demo_args = argparse.Namespace(
        task="rte",
        split="dev",
        data_dir=args.data_dir,
        model="",
        shard_size=25,
        max_train_examples=None,
    )
    with tempfile.TemporaryDirectory(prefix="bertvision-ui-") as tmp:
        demo = Demo(Path(tmp), demo_args, ui=True)
        try:
            demo.start_server()
            demo.deploy()
            demo.start_worker("bertvision", "local-1")
            retried = demo.kill_9_then_retry(Path(tmp) / "emb")
            failed, out = failing_shard_run(demo, Path(tmp))
            progress = _artifact(demo.env, demo._artifact_key(Path(tmp) / "emb") + "-progress")
            table = _artifact(demo.env, demo._artifact_key(out, "wnli") + "-shards")
            pages = {
                "runs-list.png": "/runs",
                "flow-run.png": f"/runs/flow-run/{retried}",
                "progress-artifact.png": f"/artifacts/artifact/{progress['latest_id']}",
                "shard-table.png": f"/artifacts/artifact/{table['latest_id']}",
                "failed-flow-run.png": f"/runs/flow-run/{failed}",
            }
            screenshots(demo.ui_url, pages, Path(args.out), args.chromium)
        finally:
            demo.stop_all()


def failing_shard_run(demo: Demo, tmp: Path) -> tuple[str, Path]:
    """Run extract-glue on WNLI dev with a model that gives NaN for one token of one example in
    shard 1; returns the flow run's id (Failed) and its output folder."""
    print("\n3. a shard that fails: a model whose embedding of one token is NaN")
    model, token, example = nan_token_model(tmp / "nan-model", demo.args.data_dir, "wnli", 25)
    print(f"   token {token!r}, only in example {example} (shard 1 of wnli/dev in shards of 25)")
    out = tmp / "emb-failing"
    cfg = {"task": "wnli", "model": str(model)}
    log = demo._prefect(
        "deployment", "run", "extract-glue/extract-glue", *demo._params(out, cfg), "--watch",
        check=False,
    )  # fmt: skip
    flow_run_id = _flow_run_id(log)
    _wait_for(demo.env, flow_run_id, ("FAILED", "COMPLETED", "CRASHED"))
    state = _state(demo.env, flow_run_id)
    print(f"   flow run {state}")
    assert state == "FAILED", state
    return flow_run_id, out


def nan_token_model(folder: Path, data_dir: str, task: str, shard_size: int):
    """A copy of the bundled MiniLM whose word embedding of one token is NaN: a token that occurs
    in exactly one example of `task`'s dev split, in shard 1 (examples shard_size to
    2 * shard_size - 1). Returns (folder, the token, the example's index)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bertvision.encoder import default_model
    from bertvision.glue import load_split

    tokenizer = AutoTokenizer.from_pretrained(default_model())
    examples = load_split(task, "dev", data_dir)
    tokens = [set(tokenizer(*ex.texts)["input_ids"]) for ex in examples]
    seen = [sum(t in ids for ids in tokens) for t in range(tokenizer.vocab_size)]
    example = next(
        i for i in range(shard_size, 2 * shard_size) if any(seen[t] == 1 for t in tokens[i])
    )
    token = min(t for t in tokens[example] if seen[t] == 1)
    model = AutoModel.from_pretrained(default_model())
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[token] = float("nan")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer.convert_ids_to_tokens(token), example


def screenshots(ui_url: str, pages: dict[str, str], out: Path, chromium: str) -> None:
    """Save each page (path under the UI) as a PNG, once the page has drawn its data."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        for name, path in pages.items():
            started = time.perf_counter()
            page.goto(ui_url + path, wait_until="networkidle")
            page.wait_for_timeout(2000)  # charts and graphs animate in
            page.screenshot(path=out / name)
            size = (out / name).stat().st_size
            print(f"   {out / name}: {size / 1000:.0f} kB in {time.perf_counter() - started:.1f} s")
        browser.close()


if __name__ == "__main__":
    main()
