# The fetched harness and the pip --target environment of the oldest peft live here; never collect them.
collect_ignore_glob = ["_peft_harness/*"]
