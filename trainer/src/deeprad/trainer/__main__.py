"""`python -m deeprad.trainer --store URL --task JSON|@FILE`: one site, one round."""

import sys

from deeprad.core.jobargs import job_main
from deeprad.core.protocol import TrainingTask
from deeprad.trainer.job import run_training_task

if __name__ == "__main__":
    sys.exit(job_main("deeprad.trainer", "Train one site for one round and upload its update.",
                      TrainingTask, run_training_task))
