"""The served pipeline and its backends (``maskattn-deploy generate``).

Modules (import them directly; this package imports nothing heavy):

- :mod:`.base`: the component-runner interface and :class:`~.base.Backend`.
- :mod:`.torch_backend`, :mod:`.ort_backend`, :mod:`.trt_backend`: the three backends.
- :mod:`.pipeline`: SDXL text-to-image over any backend (:class:`~.pipeline.Pipeline`).
- :mod:`.model_info`: tokenizers, scheduler config and limits from a pipeline or an export.
- :mod:`.schedulers`, :mod:`.masks`, :mod:`.outputs`: samplers, mask grids, PNG/JSON output.
- :mod:`.api`: the whole ``generate`` command as :func:`~.api.run_generate`.
"""
