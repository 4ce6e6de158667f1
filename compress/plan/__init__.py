"""The hardware-aware planner: device profiles (``devices``), a cost model, sensitivity, the plan."""
