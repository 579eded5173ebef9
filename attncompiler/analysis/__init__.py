"""Pattern analysis: attention graphs, reachability, expansion and cost."""
