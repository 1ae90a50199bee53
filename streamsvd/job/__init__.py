"""The job: the compression loop, its state file, memory planning and evaluation."""
