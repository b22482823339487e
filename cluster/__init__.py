"""stoker.cluster: connecting to Ray (embedded or remote), job submission, runs registry."""
