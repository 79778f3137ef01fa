"""The training recipe at toy scale: a synthetic captioned shapes world (``world``), its scorer (``score``),
the trainer (``train``), the autoencoder / text encoder / teacher stages (``stages``), and the
``mlx-video recipe`` and ``mlx-video eval`` commands (``cli``, ``evaluate``).

The runtime (``mlx_video`` outside this package) never imports it; the recipe writes ordinary model folders.
"""
