"""Speed and memory benchmarks of the two bundles (docs/performance.md).

Commands, each runnable as ``python benchmarks/<name>.py`` or ``python -m benchmarks.<name>`` from the repository
root:

* ``run_benchmarks``: both bundles side by side with MONAI's recipes, one section per module below;
* ``loader_throughput``: training-loader cases/s per CPU core;
* ``inference_split``: where an inference case's time goes, per stage;
* ``interleaved_training_step``: A/B training step, segresnet_vae against MONAI's ``SegResNetVAE``;
* ``gpu_check`` (through ``gpu_check.sh``): the standing GPU check.

Sections of ``run_benchmarks``: :mod:`benchmarks.inference` (with the Model Zoo recipe ``model_zoo_recipe.json``),
:mod:`benchmarks.training`, :mod:`benchmarks.data`, :mod:`benchmarks.flops`, :mod:`benchmarks.levers`. Shared
helpers: :mod:`benchmarks.timing`, :mod:`benchmarks.memory`, :mod:`benchmarks.machine`, :mod:`benchmarks.tables`.
"""
