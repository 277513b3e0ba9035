"""One module per report section: build(run) -> the dict its part of the template reads."""
