"""The harness: matrices, the case runner, the cache, regression checks, calibration, plans, distributed runs,
reports and the command line. The library (``backdoor`` outside this package) never imports it."""
