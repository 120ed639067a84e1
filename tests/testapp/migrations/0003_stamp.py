import django
import django.db.models.functions.datetime
from django.db import migrations, models

# db_default needs Django 5 (the model says the same)
_CREATED = ({"db_default": django.db.models.functions.datetime.Now()} if django.VERSION >= (5, 0)
            else {"null": True})


class Migration(migrations.Migration):

    dependencies = [
        ('testapp', '0002_note'),
    ]

    operations = [
        migrations.CreateModel(
            name='Stamp',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('label', models.CharField(max_length=50)),
                ('at', models.DateTimeField(null=True)),
                ('day', models.DateField(null=True)),
                ('number', models.FloatField(null=True)),
                ('text', models.CharField(blank=True, default='', max_length=100)),
                ('now', models.CharField(blank=True, default='', max_length=100)),
                ('created', models.DateTimeField(**_CREATED)),
            ],
        ),
    ]
