"""stoker.datasets: raw data -> clean -> transform -> split -> Parquet shards + manifest."""
