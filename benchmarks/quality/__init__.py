"""Quality benchmark suites: LoRA adapters trained here on real text (issue 4, point 2)."""
