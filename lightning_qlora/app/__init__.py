"""Parts of the Hydra app (:mod:`lightning_qlora.train`) that are not training: the run's report
(predictions, files written, results table), a step-counting progress bar, a metrics log that
continues on resume, and the entry point's filter of third-party noise."""
