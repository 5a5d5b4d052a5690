"""The core every stage builds on: frames and streams, the stage loop, configuration,
start-up, paths, the metric registry, kernel files, resctrl files, priority rules.
The core imports no stage and no plug-in."""
