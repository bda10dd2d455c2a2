"""softprompt-runtime: serve soft prompts (prompt tuning) with a cached, shared prefix."""
