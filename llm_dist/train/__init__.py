"""The trainer core shared by every stage: optimizer, schedules, the train step, logging."""
