"""Parameter importance: estimators, aggregation, shift metrics, reports and the stage."""
