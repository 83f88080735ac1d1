"""Planning: the hardware, the model's memory, and the plan (planner) with its phases."""
