"""`python -m deeprad.aggregator --store URL --task JSON|@FILE`: aggregate one round."""

import sys

from deeprad.aggregator.job import run_aggregation_task
from deeprad.core.jobargs import job_main
from deeprad.core.protocol import AggregationTask

if __name__ == "__main__":
    sys.exit(job_main("deeprad.aggregator", "Aggregate one round's updates into the next global "
                      "checkpoint.", AggregationTask, run_aggregation_task))
