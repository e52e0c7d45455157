"""Teaching aids for the notebooks: checkers of the code exercises (:mod:`pfl.teach.checkers`).

The top layer of the package: it may import anything in ``pfl``; nothing in ``pfl`` imports it.
"""
