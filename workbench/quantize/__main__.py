"""``python -m workbench.quantize --variant gptq-int4``: the stage in .venv-quant, without papermill
or MLflow (see ``workbench.quantize.stage.main``)."""

from workbench.quantize.stage import main

raise SystemExit(main())
