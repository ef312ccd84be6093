class PipelineError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""
