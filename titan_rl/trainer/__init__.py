"""Trainer service: the learner loop plus Status / policy / checkpoint / Stop calls."""
