from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("hypervisors", "0009_ssh_host_keys"),
    ]

    operations = [
        migrations.AddField(
            model_name="hypervisor",
            name="maintenance",
            field=models.BooleanField(
                default=False,
                help_text="Drained: no machine is created or moved here; the machines it has run on and are still watched.",
                verbose_name="in maintenance",
            ),
        ),
    ]
