"""Training scripts for the memory methods (run through `lm-eval-dlmem train metastate|memdlm`)."""
