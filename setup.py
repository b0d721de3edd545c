"""Build hook: put the bundled checkpoints (models/<family>/) into the wheel as mone_export/bundled_models/<family>/.

Everything else about the package is in pyproject.toml. Editable installs skip the copy: mone_export.loading finds
<checkout>/models/<name> itself.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v2")  # = mone_export.loading.BUNDLED_MODELS
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.md", "*.txt", "*.model")


class BuildPyWithModels(build_py):
    """build_py that also copies the bundled checkpoints into the package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in BUNDLED:
            src = ROOT / "models" / name
            if not (src / "config.json").is_file():
                raise SystemExit(f"models/{name}/config.json is missing: train it (models/train.py) before building")
            dst = Path(self.build_lib) / "mone_export" / "bundled_models" / name
            self.mkpath(str(dst))
            for pattern in CHECKPOINT_FILES:
                for file in sorted(src.glob(pattern)):
                    self.copy_file(str(file), str(dst / file.name))


setup(cmdclass={"build_py": BuildPyWithModels})
