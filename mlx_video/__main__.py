import sys

from mlx_video.cli import main

sys.exit(main())
