"""The Live widget: training while the user paints (:mod:`.widget`)."""
