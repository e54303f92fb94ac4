"""Built-in calibration / LM-probe text for layer selection, so ``sala select-layers`` runs offline.

Original prose written for this project (no third-party text). It is deliberately small: enough to exercise the
pipeline and to rank layers of small models; pass real text files (``text_files``) for a 1B+ source.
"""

DEFAULT_TEXT = """\
A river begins as rain that the ground cannot hold. Water gathers in small channels on a hillside, the channels
join, and after a few miles the stream has a name on the map. Along the way it carries sand, leaves and the slow
dust of the mountains, and it drops that load wherever the current weakens: on the inside of a bend, behind a
fallen tree, or at the mouth where it meets the sea. Over centuries these small deposits build islands and
marshes, and the river moves across its valley like a rope that is shaken very slowly. People who live beside
rivers learn to read them. A dark, smooth patch of water often hides a deep pool, while a line of ripples marks
a shallow bar of gravel. In spring the river rises with melting snow; in late summer it can shrink to a thread.

Bread is one of the oldest things people make on purpose. Flour, water, salt and a little yeast are mixed into
a dough, and the dough is left to rest. During that rest the yeast eats sugars in the flour and releases gas,
which the stretchy proteins of the wheat trap in countless small bubbles. Kneading lines those proteins up into
long strands, so the dough can rise without tearing. A baker shapes the loaf, lets it rise a second time, and
then bakes it in a hot oven. The heat makes the gas expand one last time before the crumb sets, and the surface
browns into a crust. Every step can be changed: more water gives an open, irregular crumb, a cooler kitchen
slows the yeast, and a longer rest develops a deeper, slightly sour flavour.

Before mechanical clocks, towns told time by the sun, by water flowing from one vessel into another, or by
candles marked with rings. The first mechanical clocks in Europe had no faces at all; they simply struck a bell
each hour. Their heart was the escapement, a small device that lets a falling weight or a wound spring release
its energy in equal steps instead of all at once. Later the pendulum made clocks far more accurate, because a
swinging weight keeps nearly the same period no matter how wide it swings. Sailors needed accurate clocks for a
different reason: by comparing local noon with the time at their home port, they could work out how far east or
west they had travelled. A clock that kept good time on a rolling ship was therefore worth a great deal.

A lighthouse keeper's work was mostly routine. Each evening the keeper climbed the tower, trimmed the wick,
polished the lens and lit the lamp before sunset. Through the night the light had to be watched, the clockwork
that turned the lens had to be wound, and the log had to be kept: the weather, passing ships, anything unusual.
In fog the keeper sounded a horn at fixed intervals, so that each station could be recognised by its pattern.
Supplies came by boat and could be delayed for weeks by storms, so keepers stored food, oil and coal well ahead.
Most lights are automatic now, but the towers remain, and many still flash the same sequence they always did.

Honey bees live in colonies of tens of thousands. Almost all of them are female workers, and what a worker does
depends on her age. Young bees clean cells and feed larvae; somewhat older bees build comb from wax, guard the
entrance and fan their wings to cool the hive; the oldest fly out to gather nectar, pollen and water. A forager
that finds a good patch of flowers returns and performs a dance on the comb. The angle of the dance relative to
straight up tells the other bees the direction of the flowers relative to the sun, and the length of the waggle
tells them the distance. In this way a colony can send most of its foragers to the best sources within a day.

Maps are arguments as much as pictures. Every flat map of the round earth must stretch something: areas,
shapes, distances or directions. A map made for navigation keeps angles true, so a straight line on it is a
constant compass course, but it makes lands near the poles look far larger than they are. A map made to compare
the sizes of countries keeps areas true and bends shapes instead. Choosing a projection is choosing which errors
matter least for the question at hand. The same is true of what a map leaves out. A road map omits the soil, a
geological map omits the roads, and a good map maker decides carefully what the reader does not need to see.

In a small workshop, a carpenter keeps her tools in the order she uses them. The saw hangs nearest the bench, then
the planes, then the chisels in a rack sorted by width. Before cutting a joint she marks both pieces with a knife
rather than a pencil, because a knife line is thinner and gives the chisel a place to start. She checks each face
against a straight edge and each corner against a square. Wood moves with the seasons, swelling when the air is
damp and shrinking when it is dry, so a panel in a door is left free to slide in its groove instead of being glued
tight. A table built this way can last for generations, long after the person who made it is gone.
"""
