"""The ``tledge`` command line: Click commands that turn options into one library call each."""
