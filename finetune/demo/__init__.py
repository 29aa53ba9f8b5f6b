"""The demo model: a small MiniCPM-o trained end to end on the synthetic omni-duplex world, with the finetune/
recipes, on 2 CPU cores (`python -m finetune.demo --out minicpmo/assets/demo_model`). See finetune/demo/README.md."""
