"""Generate mlx-swift code, weights and golden tests from mlx-video model folders (``mlx-video export-swift``).

- ``export``: the command and the orchestration (read the folder, generate, write weights and golden
  fixtures, verify, swap the output in atomically).
- ``components``: which Python config/model each Swift file mirrors, golden (tiny) configs.
- ``codegen``: configuration structs from config dataclasses, ``@ModuleInfo``/``@ParameterInfo``
  declarations from the Python module tree, template expansion (``templates/*.swift``).
- ``weights``: deterministic safetensors writer, export dtypes.
- ``golden``: the golden model and the fixtures the Python runtime computes for the XCTests.
- ``swiftcheck``: tree-sitter-swift syntax check and the parameter tree the Swift declares.
- ``spm``: a Python mirror of the generated Swift tokenizer (tested against sentencepiece).
- ``swiftbuild`` / ``verify``: ``export-swift --verify`` / ``--verify-only``: compile the export with ``swift``
  against ``standin/`` (a CPU test double of mlx-swift, never shipped) and run its golden XCTests.
- ``standin_fixtures``: inputs and Python-MLX outputs that the stand-in's own XCTests check every op against.
"""

import mlx_video  # noqa: F401
