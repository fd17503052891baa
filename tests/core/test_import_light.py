import subprocess
import sys

CORE_MODULES = [
    "lmserve",
    "lmserve.core",
    "lmserve.core.hookspecs",
    "lmserve.core.plugins",
    "lmserve.core.bus",
    "lmserve.core.types",
    "lmserve.core.config",
    "lmserve.core.backend",
    "lmserve.core.chat_template",
    "lmserve.core.model_source",
    "lmserve.core.tokenizer",
    "lmserve.core.detokenizer",
    "lmserve.core.progress",
]


def test_core_imports_neither_torch_nor_sanic():
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in CORE_MODULES)
        + "heavy = sorted(m for m in ('torch', 'sanic', 'transformers') if m in sys.modules)\n"
        + "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"core pulled in: {result.stdout.strip()}"
