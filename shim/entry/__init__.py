"""Entry points: thaw-runtime, thaw and the doctor own argv, exec and exit; nothing else."""
