"""`kvmesh generate` runs prompts as one batch and prints one JSON line per prompt, in order."""

import json

from kvmesh.services.cli import main


def test_generate_json_lines_in_prompt_order(model_dir, capsys):
    path = model_dir("llama")
    prompts = ["The capital of France is", "Hello", "def main():\n"]
    assert main(["generate", "--model", str(path), "--max-tokens", "5", "--json"]
                + [a for p in prompts for a in ("--prompt", p)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == prompts
    for r in lines:
        assert set(r) == {"prompt", "prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert 1 <= len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length")
        assert isinstance(r["text"], str) and r["prompt_token_ids"]


def test_generate_is_seeded_and_prints_text(model_dir, capsys):
    args = ["generate", "--model", str(model_dir("llama")), "--prompt", "Hello", "--max-tokens", "8",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first and first.strip()
